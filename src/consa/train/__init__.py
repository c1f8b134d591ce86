"""Training: ConSA search, base-model pretraining (:mod:`consa.train.pretrain`) and heal fine-tuning."""
