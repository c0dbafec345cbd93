"""
The machinery behind the experiment scripts: how a run is run, never what it computes (the loss and
the masks are masking.py's, the network model.py's, the formulas theory.py's). A script reaches it
through a few named calls; a first reading can skip this folder.

    run.py          Run: a run's folder (who owns it, one writer, "done"), checkpoints, log, summary,
                    its inputs' fingerprints, torchrun; the line Ctrl-C and SIGTERM print
    cli.py          the shared flags, the checks that turn a user's mistake into one line, run_cli
    distributed.py  torchrun with bounded waits; every rank agreeing on an error
    files.py        files written whole or not at all, read with one-line errors, fingerprinted
    optim.py        the learning-rate schedule and gradient clipping of every script
    sweep.py        many runs of one script: one queue over CPU processes or GPUs, and their folder
    corpus.py       raw text as cached token ids (WikiText; GPT-2 BPE or bytes)
    dclm.py         DCLM streamed and dealt to data slots (pre-training's data)
    llada.py        LLaDA's formats: tokenizer ids, chat template, config.json, safetensors
    fsdp.py         FSDP2 for the 8B scripts: build, the check step, sharded checkpoints, export
    plan.py         what an 8B run needs (--dry-run, --ac auto) and how fast steps go (--benchmark)
"""
