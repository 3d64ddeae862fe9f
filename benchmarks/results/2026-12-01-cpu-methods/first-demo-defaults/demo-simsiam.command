jaxssl train --workdir W --config demo --config.method=simsiam
