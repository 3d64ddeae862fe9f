jaxssl train --workdir W --config demo --config.method=vicreg
