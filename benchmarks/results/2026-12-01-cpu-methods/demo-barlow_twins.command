jaxssl train --workdir W --config configs/demo.py:barlow_twins
