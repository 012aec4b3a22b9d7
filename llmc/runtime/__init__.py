"""llmc.runtime: the only part of llmc that imports torch. Import the submodules directly (this package
imports nothing heavy).

API for the other backends (post-training, DeepSpeed, torchtitan):

* ``model``: ``Transformer(arch)`` (torchtitan parameter names; builds on ``torch.device("meta")`` for any
  preset), ``build_model(arch, device="cpu", seed=0, init=None)``, ``model(tokens, return_aux=True) -> (logits, aux)``,
  ``lm_loss(logits, labels, z_loss=0.0)`` (ignore_index -100), ``model.set_ac("none"|"selective"|"full")``,
  ``model.set_ac("partial", K)`` (the first K blocks recomputed whole),
  ``model.init_weights(init)`` (``init``: the lock's ``model.init``, ``TrainJob.init``; None: the default scheme),
  ``model.generate(tokens, n, temperature)``, ``model.num_params()``.
* ``job``: ``TrainJob.from_lock(lock, stage=None)`` reads the stage's ``lock["stages"]`` entry; fields
  arch, sources, tokenizer, seq_len, steps, lr, min_lr, warmup_steps, schedule, micro_batch, grad_accum,
  dp_replicate, dp_shard, tp, ..., activation_checkpointing, ac_layers, ``stage_spec`` (the Stage) and
  ``stage_plan`` (the lock entry);
  ``job.lr_factor(step)`` / ``lr_factor(...)``: the one LR schedule of every loop; ``check_ac`` (``ac_label`` is ``llmc.spec.schema``'s, shared with the compiler);
* ``entry``: ``prepare_assets(job, root) -> Assets`` writes ``root/assets/tokenizer.json`` (+ config) and
  names every source where it lies, for every backend (builtin corpora are generated into ``root/data/``;
  ``eval.validation``'s held-out split is applied while streaming); ``python -m llmc.runtime.entry [prepare] --lock ...``.
* ``data``: ``Assets`` (tokenizer_dir, sources), ``build_stream_loader(sources, tok, seq_len, slots, seed,
  dp_rank, dp_size) -> StreamLoader`` with ``next_batch(mb) -> (inputs, labels)``, ``full_state()`` /
  ``load_state_dict()``; ``SourceData`` (a source, optionally one part of the held-out split).
* ``tokenizer``: ``TextTokenizer(dir)`` (encode/decode, bos_id/eos_id/pad_id, token_id), ``train_bpe``.
* ``checkpoint``: ``save_checkpoint(folder, step, model, optim, train_state)`` (collective, atomic,
  manifest with sha256), ``load_checkpoint``, ``latest_checkpoint(folder, fallback=False)``,
  ``load_model_weights(model, step_dir | stage_dir)``, ``CheckpointError``.
* ``hf_io``: ``load_hf_into(model, dir | hub_id, arch)``, ``export_hf(state_dict, arch, out_dir)``,
  ``export_peft_adapter``, ``export_stage``; ``export``: ``export_checkpoint(run_dir, stage, step=None)`` (``python -m
  llmc.runtime.hf_io``; finds the lock, the stage and its output before importing torch).
* ``train``: ``train(job, out_dir, assets, ...)`` (native loop),
  ``build_optimizer``, ``clip_grad_norm`` (plain + DTensor grads), ``TrainingError``.
* ``distributed``: ``init_distributed() -> DistInfo``, ``parallelize(model, info, dp_replicate, dp_shard, tp, ac, ac_layers=K)``.
* ``metrics``: ``MetricsLogger`` (metrics.jsonl), ``flops_per_token``, ``active_params``, ``peak_memory_bytes``.
* ``corpus``: the offline ``python-docs`` corpus (stdlib docstrings).
"""
