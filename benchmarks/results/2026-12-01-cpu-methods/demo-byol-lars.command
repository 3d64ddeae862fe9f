jaxssl train --config demo:byol --workdir W --config.optim.name=lars --config.optim.base_lr=1.0 --config.optim.lr_scaling=linear --config.optim.weight_decay=1e-5
