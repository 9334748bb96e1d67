"""Pretraining: the data pipeline and the shared training loop.

`tokenizer.py` holds the byte and BPE tokenizers and their tokenizer.json; `data.py` turns a
text source into one token stream and cuts it into batches that are a pure function of the
step; `trainer.py` is the loop, with the run config in `config.py`, atomic checkpoints in
`checkpoint.py`, torchrun setup in `distributed.py` and loss curves in `plot.py`;
`pretrained.py` loads a finished run's LM and tokenizer back for evaluation.
"""
