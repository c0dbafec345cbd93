"""pretrain_8b.py at tiny scale on CPU: FSDP2 under torchrun (gloo), sharded checkpoints, the data
slots, export, the plan, and one-line errors on every rank. Nothing is downloaded."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

import model as model_lib
import pretrain_8b
from machinery import cli, dclm, fsdp, llada

SCRIPT = os.path.join(ROOT, "pretrain_8b.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def corpus(path, n=600):
    """Local text: one document per line, varied enough that a model has something to learn."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [" ".join(words[(i * 7 + j * (i % 5 + 1)) % len(words)] for j in range(8 + i % 9)) + f" {i}."
             for i in range(n)]
    path.write_text("\n".join(lines))
    return str(path)


def launch(args, nproc, timeout=240, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", SCRIPT]
           if nproc > 1 else [sys.executable, SCRIPT])
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def losses(run_dir):
    """step -> training loss from log.jsonl (the last record of a step wins: a resumed run re-logs)."""
    out = {}
    for line in open(os.path.join(run_dir, "log.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def tiny_args(data, out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--data", data, "--out-dir", str(out), "--max-steps", "16",
            "--save-every", "8", "--eval-every", "8", "--random-length-prob", "0.25", "--no-plot", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-process run and one one-process run of the same settings (global batch 8)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    data = corpus(tmp / "corpus.txt")
    launch(tiny_args(data, tmp / "two"), nproc=2)
    launch(tiny_args(data, tmp / "one"), nproc=1)
    return dict(tmp=tmp, data=data, two=str(tmp / "two"), one=str(tmp / "one"))


def test_two_processes_learn_and_match_one_process(runs):
    two, one = losses(runs["two"]), losses(runs["one"])
    assert sorted(two) == list(range(1, 17))
    assert all(math.isfinite(v) for v in two.values())
    first, last = sum(two[s] for s in (1, 2, 3)) / 3, sum(two[s] for s in (14, 15, 16)) / 3
    assert last < first - 1.0, two                          # it learns (uniform over 262 ids: 5.57)
    # the same global batch, masks and initial weights at any world size: only the order of float
    # sums differs (gloo's reduce-scatter), so the losses agree to 1e-4
    assert max(abs(two[s] - one[s]) for s in two) < 1e-4, (two, one)
    s2, s1 = (json.load(open(os.path.join(r, "summary.json"))) for r in (runs["two"], runs["one"]))
    assert s2["steps"] == 16 and s2["world_size"] == 2
    # tokens trained on count LLaDA's random-length crops (a quarter of the steps here), not 16 x 8 x 64
    cfg = pretrain_8b.PretrainConfig(**{**pretrain_8b.PRESETS["tiny"], "random_length_prob": 0.25})
    assert s2["tokens"] == 8 * sum(pretrain_8b.sequence_length(s, cfg) for s in range(16)) < 16 * 8 * 64
    assert abs(s2["test_loss"] - s1["test_loss"]) < 1e-4
    assert [step for step, _ in s2["test_loss_curve"]] == [8, 16]


def test_random_length_steps_have_one_length_on_every_rank(runs):
    lengths = {}
    for line in open(os.path.join(runs["two"], "log.jsonl")):
        rec = json.loads(line)
        if "seq_len" in rec:
            lengths[rec["step"]] = rec["seq_len"]
    # the loop all-reduces each step's length (max and min) and stops on a mismatch; some steps were cropped
    assert any(v < 64 for v in lengths.values()) and any(v == 64 for v in lengths.values())
    assert all(pretrain_8b.sequence_length(s - 1, pretrain_8b.PretrainConfig(
        **{**pretrain_8b.PRESETS["tiny"], "random_length_prob": 0.25})) == v for s, v in lengths.items())


def test_sequence_length_is_a_function_of_the_step():
    cfg = pretrain_8b.PretrainConfig(block_size=4096, random_length_prob=0.01)
    draws = [pretrain_8b.sequence_length(s, cfg) for s in range(20000)]
    assert draws == [pretrain_8b.sequence_length(s, cfg) for s in range(20000)]
    short = [L for L in draws if L < 4096]
    assert 140 < len(short) < 260 and min(short) >= 1               # ~1% of 20,000 steps


def test_resume_on_another_world_size_continues_exactly(runs):
    resumed = runs["tmp"] / "resumed"
    shutil.copytree(runs["one"], resumed)
    shutil.rmtree(resumed / "step_0000016")
    shutil.rmtree(resumed / "export")          # resuming never writes over an earlier export
    for f in ("summary.json", "log.jsonl"):
        os.remove(resumed / f)
    r = launch(tiny_args(runs["data"], resumed, "--resume"), nproc=2)
    assert "resumed" in r.stdout and "step_0000008 at step 8" in r.stdout
    again, one = losses(resumed), losses(runs["one"])
    assert sorted(again) == list(range(9, 17))
    assert max(abs(again[s] - one[s]) for s in again) < 1e-4


def test_killed_run_resumes_with_the_same_next_step_loss(tmp_path):
    data = corpus(tmp_path / "corpus.txt")
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--schedule", "constant", "--save-every", "3",
            "--eval-every", "1000", "--no-plot"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--out-dir", str(tmp_path / "a"), "--max-steps",
                             "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 120
    while not fsdp.checkpoints(str(tmp_path / "a")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                     # kill -9, possibly in the middle of a save
    proc.wait()
    step = int(os.path.basename(fsdp.checkpoints(str(tmp_path / "a"))[-1])[5:])
    launch([*args, "--out-dir", str(tmp_path / "a"), "--max-steps", str(step + 2), "--resume",
            "--allow-change", "max_steps"], nproc=1)
    launch([*args, "--out-dir", str(tmp_path / "b"), "--max-steps", str(step + 2)], nproc=1)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a[step + 1] == b[step + 1] and a[step + 2] == b[step + 2]      # bit-identical on one CPU process


def test_export_loads_back_with_the_same_heldout_nll(runs):
    folder = os.path.join(runs["two"], "export")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["eos_token_id"] == 256 and config["mask_token_id"] == 257 and config["vocab_size"] == 262
    m = model_lib.Transformer(llada.config_from_json(config))
    llada.load_safetensors(m, folder)
    cfg = pretrain_8b.PretrainConfig(**json.load(open(os.path.join(runs["two"], "summary.json")))["settings"])
    tok = llada.load_tokenizer(folder)
    assert tok.encode("hé").ids == [104, 195, 169]
    ds = dclm.open_documents(*dclm.listing(cfg))
    seqs, _, _ = dclm.held_out_set(ds, tok, 256, cfg, "test")
    with world_of_one(tmp_dir=runs["tmp"]):
        nll = fsdp.heldout_nll(m, seqs, cfg, "cpu")
    assert nll == pytest.approx(json.load(open(os.path.join(runs["two"], "summary.json")))["test_loss"], abs=1e-4)


class world_of_one:
    def __init__(self, tmp_dir):
        self.init = f"file://{tmp_dir}/pg_{time.time_ns()}"

    def __enter__(self):
        dist.init_process_group("gloo", init_method=self.init, rank=0, world_size=1)

    def __exit__(self, *exc):
        dist.destroy_process_group()


def test_a_tokenizer_built_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    data = corpus(tmp_path / "corpus.txt")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([data], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<|endoftext|>",
                                                                         "<|mdm_mask|>"]))
    tok.save(str(tmp_path / "tok.json"))
    ids = llada.token_ids(Tokenizer.from_file(str(tmp_path / "tok.json")))
    assert ids["eos"] == 1 and ids["mask"] == 2
    launch(["--preset", "tiny", "--device", "cpu", "--data", data, "--tokenizer", str(tmp_path / "tok.json"),
            "--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--no-plot"], nproc=1)
    config = json.load(open(tmp_path / "run" / "export" / "config.json"))
    assert config["vocab_size"] == ids["vocab"] <= 120 and config["mask_token_id"] == 2
    assert Tokenizer.from_file(str(tmp_path / "run" / "export" / "tokenizer.json")).to_str() == tok.to_str()


def test_dry_run_prints_the_8b_plan():
    r = launch(["--dry-run", "--no-trace"], nproc=1)             # the trace at this size: tests/test_plan.py
    assert "8,015,581,184 parameters" in r.stdout
    assert "8 GPUs, micro-batch 2 (8 accumulation steps)" in r.stdout and "implies" in r.stdout


def test_benchmark_runs_on_cpu():
    r = launch(["--preset", "tiny", "--device", "cpu", "--benchmark", "--bench-steps", "2"], nproc=1)
    assert "tokens/s per GPU" in r.stdout
    # the full run's optimizer step (8 rows = 4 micro-batches of 2 on one GPU), never more blocks than the model
    assert "2 of 2 blocks (d_model 32) + head, 4 x 2 x 64 tokens per GPU per step, 1 GPU(s)" in r.stdout


@pytest.mark.parametrize("case", ["batch", "empty"])
def test_errors_under_torchrun_are_one_line_on_rank_0_and_every_rank_exits(tmp_path, case):
    data = corpus(tmp_path / "corpus.txt") if case != "empty" else str(tmp_path / "empty.txt")
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
    extra = ["--batch-size", "6"] if case == "batch" else []
    r = launch(["--preset", "tiny", "--device", "cpu", "--data", data, "--out-dir", str(tmp_path / "out"),
                "--max-steps", "2", *extra], nproc=2, timeout=120, check=False)
    assert r.returncode != 0
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert len(ours) == 1, r.stderr
    assert ("multiple of micro-batch 2 x 2" if case == "batch" else "is empty") in ours[0]
    assert "pretrain_8b.py\", line" not in r.stderr               # no traceback from our processes


@pytest.mark.parametrize("case", ["missing", "t0>t1", "corrupt", "half-written", "tokenizer", "field"])
def test_bad_input_is_one_line(tmp_path, case):
    data = corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--out-dir", str(out), "--max-steps", "2",
            "--no-plot"]
    if case in ("corrupt", "half-written"):
        launch(args, nproc=1)
        ckpt = fsdp.checkpoints(str(out))[-1]
        if case == "corrupt":
            shard = os.path.join(ckpt, "__0_0.distcp")
            open(shard, "r+b").truncate(100)
        else:
            os.remove(os.path.join(ckpt, ".metadata"))              # killed before the metadata was written
        args += ["--resume", "--max-steps", "4", "--allow-change", "max_steps", "--export", str(tmp_path / "export2")]
    elif case == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nowhere.txt")
    elif case == "t0>t1":
        args += ["--t0", "0.6", "--t1", "0.2"]
    elif case == "tokenizer":
        args += ["--tokenizer", str(tmp_path / "none.json")]
    elif case == "field":
        (tmp_path / "rows.jsonl").write_text('{"body": "no text field"}\n')
        args[args.index("--data") + 1] = str(tmp_path / "rows.jsonl")
    r = launch(args, nproc=1, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr
    want = {"missing": "does not exist", "t0>t1": "t0 <= t1", "corrupt": "cannot be loaded",
            "half-written": "cannot be read", "tokenizer": "does not exist", "field": "no 'text' field"}[case]
    assert want in r.stderr


def test_plot_runs(runs, tmp_path):
    pretrain_8b.main(["--plot-runs", runs["one"], runs["two"], "--out-dir", str(tmp_path)])
    assert (tmp_path / "fig4_heldout_nll.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        cli.run_cli(lambda: pretrain_8b.main(["--plot-runs", str(tmp_path), "--out-dir", str(tmp_path)]))


def jsonl_folder(path, n_files, per_file=7):
    path.mkdir()
    docs = []
    for f in range(n_files):
        rows = [f"document {f}-{i}: " + " ".join(["word"] * (3 + (f * 5 + i) % 11)) for i in range(per_file)]
        (path / f"part_{f:02d}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        docs += rows
    return docs


@pytest.mark.parametrize("n_files", [5, 2])
def test_every_document_is_read_by_exactly_one_slot(tmp_path, n_files):
    """DCLM's file count is no multiple of the slots: with 5 files and 4 slots whole files are dealt
    out (each slot streams its own files only); with 2 files, rows are dealt out. Either way one pass
    of every slot reads each document once, and nothing else."""
    docs = jsonl_folder(tmp_path / "data", n_files)
    cfg = pretrain_8b.PretrainConfig(data=str(tmp_path / "data"), tokenizer="")
    ds = dclm.open_documents(*dclm.listing(cfg))
    streams = [dclm.slot_stream(ds, i, 4) for i in range(4)]
    read = [list(dclm.documents(s, cfg, "test", {})) for s in streams]
    assert sorted(d for r in read for d in r) == sorted(docs)
    assert all(r for r in read)
    if n_files >= 4:      # a slot streams whole files of its own: 2 + 1 + 1 + 1 of the 5
        assert sorted(s.num_shards for s in streams) == [1, 1, 1, 2]


def test_a_slot_resumes_exactly_across_files_and_epochs(tmp_path):
    """The state saved with a checkpoint (taken mid-file, several times, past the end of a pass)
    puts a fresh slot exactly where the old one was: the same blocks follow, the same masks."""
    jsonl_folder(tmp_path / "data", 5)
    cfg = pretrain_8b.PretrainConfig(data=str(tmp_path / "data"), tokenizer="", block_size=16, micro_batch=2,
                                     batch_size=8)
    tok, ids = llada.byte_tokenizer(), llada.token_ids(llada.byte_tokenizer())
    ds = dclm.open_documents(*dclm.listing(cfg))
    make = lambda: dclm.Slot(ds, 1, 4, tok, ids["eos"], cfg, set(), "cpu", "test")
    slot = make()
    for n in range(40):           # slot 1 holds 2 files of ~14 blocks: two passes and more
        state = {**slot.data_state(), "gen": slot.gen.get_state()}
        want = slot.next_batch(2), torch.rand(3, generator=slot.gen)
        if n % 7 == 3:
            fresh = make()
            fresh.load_state_dict(state)
            got = fresh.next_batch(2), torch.rand(3, generator=fresh.gen)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), n
    assert slot.epoch >= 2


# ----------------------------------------------------------------------------- issue 24: runs that survive reality

FAULT = os.path.join(ROOT, "tests", "fault.py")


def exported(folder):
    from safetensors.torch import load_file
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def test_a_killed_worker_restarts_from_the_newest_checkpoint_and_ends_bit_identical(tmp_path):
    """Issue 24.2/24.3: kill -9 of one worker between two saves, under torchrun --standalone
    --max-restarts 1 with --resume (a launcher's way to survive a lost worker). The checkpoint of step
    10 is complete as soon as it is written (before: only at the next save, so the restart went back
    to step 0), the group restarts from it, and ends with the uninterrupted run's weights, bit for bit."""
    data = corpus(tmp_path / "corpus.txt")
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--max-steps", "30", "--save-every", "10",
            "--eval-every", "30", "--schedule", "constant", "--no-plot", "--resume"]
    killed = tmp_path / "killed"
    env = {**ENV, "FAULT": "kill-at-step", "FAULT_RANK": "1", "FAULT_STEP": "13", "FAULT_MARKER": str(tmp_path / "once"),
           "FAULT_AFTER": str(killed / "step_0000010")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--max-restarts", "1", FAULT, "pretrain_8b.py", *args, "--out-dir", str(killed)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (tmp_path / "once").exists()                          # the fault fired: rank 1 was killed
    records = [json.loads(line) for line in open(killed / "log.jsonl")]
    assert [rec["resumed"] for rec in records if "resumed" in rec] == [10]
    launch([*args, "--out-dir", str(tmp_path / "whole")], nproc=2)
    a, b = losses(killed), losses(tmp_path / "whole")
    assert sorted(a) == list(range(1, 31)) and all(a[s] == b[s] for s in a)
    wa, wb = exported(killed / "export"), exported(tmp_path / "whole" / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_nodes_with_a_c10d_rendezvous_train_are_killed_and_resume(tmp_path):
    """Issue 24.9: two torchrun agents (--nnodes 2 --nproc_per_node 1, c10d on localhost), as two nodes
    would run. A worker of one node is killed; both agents restart their workers (--max-restarts 1),
    rank 0 picks the checkpoint and every rank resumes it; the result is the one-node run's."""
    from machinery.distributed import free_port
    data = corpus(tmp_path / "corpus.txt")
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--max-steps", "20", "--save-every", "10",
            "--eval-every", "20", "--schedule", "constant", "--no-plot", "--resume", "--out-dir", str(tmp_path / "run")]
    port = free_port()
    agents = []
    for node in range(2):
        env = {**ENV, "FAULT": "kill-at-step", "FAULT_RANK": "1", "FAULT_STEP": "13", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               "FAULT_MARKER": str(tmp_path / f"once{node}"), "FAULT_AFTER": str(tmp_path / "run" / "step_0000010")}
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--max-restarts",
             "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", FAULT,
             "pretrain_8b.py", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outs = [a.communicate(timeout=300) for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(o[1][-3000:] for o in outs)
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [rec["resumed"] for rec in records if "resumed" in rec] == [10]
    launch([*args[:-2], "--out-dir", str(tmp_path / "one_node")], nproc=2)
    a, b = losses(tmp_path / "run"), losses(tmp_path / "one_node")
    assert sorted(a) == list(range(1, 21)) and all(a[s] == b[s] for s in a)


def test_an_out_dir_a_node_does_not_see_is_one_line(tmp_path):
    """Issue 24.9: every rank must see --out-dir (checkpoints of several nodes must meet in one place):
    a rank that does not find rank 0's probe file stops every rank, in one line naming the folder."""
    data = corpus(tmp_path / "corpus.txt")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAULT,
                        "pretrain_8b.py", "--preset", "tiny", "--device", "cpu", "--data", data, "--max-steps", "2",
                        "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env={**ENV, "FAULT": "hide-probe"}, cwd=ROOT)
    assert r.returncode != 0
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "is not seen by every rank" in ours[0] and str(tmp_path / "run") in ours[0], r.stderr
    assert not (tmp_path / "run").exists()             # the refused run left nothing behind


def dclm_folder(path, n_shards=3, per_shard=9):
    """A local folder laid out like DCLM: global-shard_*/local-shard_*/*.jsonl.zstd shards."""
    import zstandard
    docs = []
    for g in range(2):
        for s in range(n_shards):
            folder = path / f"global-shard_{g + 1:02d}_of_10" / f"local-shard_{s}_of_10"
            folder.mkdir(parents=True)
            rows = [dict(text=f"shard {g}.{s} doc {i}: " + " ".join(["token"] * (4 + i)), url=f"u{i}") for i in range(per_shard)]
            docs += [r["text"] for r in rows]
            raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
            (folder / f"shard_{s:08d}_processed.jsonl.zstd").write_bytes(zstandard.ZstdCompressor().compress(raw))
    return docs


def test_dclm_layout_of_zstd_shards_is_read_whole_in_an_order_shuffled_by_the_seed(tmp_path):
    """Issue 24.4: DCLM's real files are *.jsonl.zstd under global-shard_*/local-shard_*/. They are read
    (zstandard), every document once over the slots; the file order is shuffled by --seed (the same
    on any world size: it is decided before the slots), not the sorted listing's first files."""
    docs = dclm_folder(tmp_path / "dclm")
    cfg = pretrain_8b.PretrainConfig(data=str(tmp_path / "dclm"), tokenizer="")
    builder, files = dclm.listing(cfg)
    assert builder == "json" and len(files) == 6 and all(f.endswith(".jsonl.zstd") for f in files)
    assert files != sorted(files) and sorted(files) == sorted(dclm.local_files(cfg.data)[1])
    assert files == dclm.listing(cfg)[1]                                   # a function of the seed
    assert dclm.listing(dataclasses.replace(cfg, seed=1))[1] != files
    ds = dclm.open_documents(builder, files)
    read = [d for i in range(4) for d in dclm.documents(dclm.slot_stream(ds, i, 4), cfg, "test", {})]
    assert sorted(read) == sorted(docs)
    # and a whole run trains on it
    launch(["--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "dclm"), "--max-steps", "3", "--eval-docs",
            "4", "--out-dir", str(tmp_path / "run"), "--no-plot"], nproc=1)


def test_the_hub_listing_is_filtered_to_data_files(monkeypatch):
    """Issue 24.4: rank 0 lists the Hub repository once (here: a faked listing) and keeps its data files."""
    import huggingface_hub
    names = ["README.md", ".gitattributes", "global-shard_01_of_10/local-shard_0_of_10/shard_00000000_processed.jsonl.zstd",
             "global-shard_01_of_10/local-shard_0_of_10/shard_00000001_processed.jsonl.zstd"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, repo_type=None: names)
    builder, files = dclm.hub_files("mlfoundations/dclm-baseline-1.0")
    assert builder == "json" and files == [f"hf://datasets/mlfoundations/dclm-baseline-1.0/{n}" for n in names[2:]]


def test_fields_that_are_not_text_are_skipped_and_counted(tmp_path):
    """Issue 24.5: a number, a list or a dict in the text field is never str()-ed into training data."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i} is text enough"} for i in range(40)]
    rows[1], rows[2], rows[3] = {"text": 5}, {"text": ["a", "b"]}, {"text": {"nested": "x"}}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pretrain_8b.PretrainConfig(data=str(path), tokenizer="")
    skipped = {}
    builder, files = dclm.listing(cfg)
    read = list(dclm.documents(dclm.open_documents(builder, files), cfg, "test", skipped))
    assert len(read) == 37 and all(isinstance(t, str) and t.startswith("document") for t in read)
    assert {k: v for k, v in skipped.items() if k != "fields seen"} == {"'text' not text (int)": 1,
                                                                       "'text' not text (list)": 1,
                                                                       "'text' not text (dict)": 1}
    r = launch(["--preset", "tiny", "--device", "cpu", "--data", str(path), "--text-field", "text", "--max-steps", "2",
                "--eval-docs", "4", "--block-size", "16", "--out-dir", str(tmp_path / "run"), "--no-plot"], nproc=1)
    assert json.load(open(tmp_path / "run" / "summary.json"))["skipped_rows"]["'text' not text (int)"] == 1


def test_resuming_after_the_data_changed_is_refused(tmp_path):
    """Issue 26: the same --data path with other contents (the held-out set would be rebuilt from other
    text) is refused on --resume, unless --allow-change data."""
    data = corpus(tmp_path / "corpus.txt")
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--max-steps", "4", "--save-every", "2",
            "--out-dir", str(tmp_path / "run"), "--no-plot"]
    launch(args, nproc=1)
    shutil.rmtree(tmp_path / "run" / "export")
    corpus(tmp_path / "corpus.txt", n=500)                       # edited in place
    more = ["--resume", "--max-steps", "6", "--allow-change", "max_steps"]
    r = launch(args + more, nproc=1, check=False)
    assert r.returncode == 1 and "the data changed since" in r.stderr and "--allow-change data" in r.stderr, r.stderr
    launch(args + ["--resume", "--max-steps", "6", "--allow-change", "max_steps", "data"], nproc=1)
    assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 6


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path):
    """Issue 26: a checkpoint write that fails (here: a file-size limit, as a full disk fails a write)
    is one line naming the checkpoint and the last complete one; its temporary folder is removed and
    the earlier checkpoint stays intact and resumable."""
    import resource
    data = corpus(tmp_path / "corpus.txt")
    args = ["--preset", "tiny", "--device", "cpu", "--data", data, "--save-every", "2", "--eval-every", "100",
            "--out-dir", str(tmp_path / "run"), "--no-plot"]
    launch([*args, "--max-steps", "2", "--export", str(tmp_path / "e1")], nproc=1)
    before = snapshot_tree(tmp_path / "run" / "step_0000002")
    limit = 64 * 1024                         # extra.pt and log lines fit; a shard of the model's state does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, SCRIPT, *args, "--max-steps", "4", "--resume", "--allow-change", "max_steps",
                        "--export", str(tmp_path / "e2")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       preexec_fn=small_files, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: could not write") and r.stderr.count("\n") == 1, r.stderr
    assert "step_0000004" in r.stderr and "the last complete checkpoint is" in r.stderr and "step_0000002" in r.stderr
    assert sorted(os.listdir(tmp_path / "run")) == sorted(["log.jsonl", "run.json", "step_0000002", "summary.json"])
    assert snapshot_tree(tmp_path / "run" / "step_0000002") == before


def snapshot_tree(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}
