"""llmc.runtime: the only part of llmc that imports torch.

Modules (import them directly; this package imports nothing heavy):

* ``model``       Transformer(arch), build_model, lm_loss -- torchtitan parameter names
* ``tokenizer``   train_bpe, TextTokenizer (HF-compatible tokenizer dir)
* ``corpus``      offline Python-stdlib docstring corpus (``python-docs``)
* ``data``        packed, mixture-weighted, DP-sharded, resumable loader; Assets
* ``job``         TrainJob.from_lock(lock, stage), minimal_lock(...)
* ``train``       the native training loop (DDP / FSDP2 / TP), lr schedule, grad clipping
* ``checkpoint``  atomic verified checkpoints, exact resume, load_model_weights
* ``distributed`` process group, device mesh, parallelize
* ``metrics``     metrics.jsonl, MFU, peak memory
* ``run``         ``python -m llmc.runtime.run`` (+ ``prepare``), prepare_assets
"""
