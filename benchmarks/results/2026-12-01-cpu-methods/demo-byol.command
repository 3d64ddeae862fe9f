jaxssl train --workdir W --config configs/demo.py:byol
