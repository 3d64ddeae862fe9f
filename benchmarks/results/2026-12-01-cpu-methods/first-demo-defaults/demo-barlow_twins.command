jaxssl train --workdir W --config demo --config.method=barlow_twins
