"""Config lookup of mustafar_triton.autotune: shipped files, nearest bucket, user cache, tuning on
request (MUSTAFAR_TRITON_AUTOTUNE=1), the warning when nothing is tuned, fallbacks. The GPU path is taken without a GPU by monkeypatching interpreting /
device_name / num_sms, with a fake `run` and a deterministic timer in place of `gpu_time_ms`."""
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import triton

import mustafar_triton.autotune as at
from mustafar_triton._gluon_compat import GLUON_CHECKED_VERSIONS, triton_minor_version

GPU_NAME = "NVIDIA Fake-GPU 80GB (HBM3)"
FILE_NAME = "NVIDIA_Fake_GPU_80GB_HBM3.json"
CUDA = torch.device("cuda")
SELECT_BUCKET = dict(head_dim=128, dtype=torch.float16)
DECODE_BUCKET = dict(head_dim=128, group=4, dtype=torch.float16, capacity=40)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """Pretend to run on a GPU; shipped dir and user cache in tmp_path; fresh module caches."""
    monkeypatch.setattr(at, "interpreting", lambda: False)
    monkeypatch.setattr(at, "device_name", lambda device: GPU_NAME)
    monkeypatch.setattr(at, "num_sms", lambda device: 132)
    monkeypatch.setattr(at, "gluon_runs_on", lambda device: True)  # an H100
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for name in _MODULE_CACHES:
        if hasattr(at, name):
            monkeypatch.setattr(at, name, type(getattr(at, name))())
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE_DIR", str(shipped))
    monkeypatch.setenv("MUSTAFAR_TRITON_USER_CACHE", str(user))
    monkeypatch.delenv("MUSTAFAR_TRITON_AUTOTUNE", raising=False)
    return SimpleNamespace(shipped=shipped, user=user, user_file=user / FILE_NAME,
                           shipped_file=shipped / FILE_NAME, monkeypatch=monkeypatch)


_MODULE_CACHES = ("_warned", "_file_cache", "_resolved")  # per-process state of the lookup


def fresh_process():
    """Forget what this process has read / resolved, as a new process would (warnings stay)."""
    for name in ("_file_cache", "_resolved"):
        if hasattr(at, name):
            getattr(at, name).clear()


def key_of(cfg):
    return json.dumps(cfg, sort_keys=True)


def entry(kernel, config, **bucket):
    return {"kernel": kernel, "bucket": at.bucket_of(kernel, **bucket), "config": config}


def write_file(path, entries, version=None, gathers_revision=at.GATHERS_REVISION):
    """A tuned file (gathers_revision None: a file written before the field existed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    revision = {} if gathers_revision is None else {"gathers_revision": gathers_revision}
    path.write_text(json.dumps({"device": GPU_NAME, "triton_version": version or triton.__version__,
                                **revision, "entries": entries}))


class FakeBench:
    """A recording `run` plus a stand-in for autotune's timer (_timing.gpu_time_ms) returning a
    fixed time per config (the config of the run(config) call it times)."""

    def __init__(self, monkeypatch, time_of):
        self.calls = []
        self.time_of = time_of
        monkeypatch.setattr(at, "gpu_time_ms", self.time)

    def run(self, cfg):
        self.calls.append(dict(cfg))

    def time(self, fn, *args, **kwargs):
        n = len(self.calls)
        fn()
        assert len(self.calls) == n + 1, "tune must time run(config)"
        return self.time_of(self.calls[-1])

    def configs_run(self):
        return {key_of(c) for c in self.calls}


def heuristic(kernel, **bucket):
    return at.heuristic_config(kernel, CUDA, **bucket)


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------
def test_bucket_of_and_names():
    assert at.bucket_of("select", head_dim=128, dtype=torch.bfloat16, rows=1000) == \
        {"head_dim": "128", "dtype": "bfloat16", "rows": 1024}
    assert at.bucket_of("decode", head_dim=64, group=3, dtype=torch.float32, capacity=40,
                        batch_heads=0, context=4097) == \
        {"head_dim": "64", "group": "3", "dtype": "float32", "capacity": "40", "batch_heads": 1, "context": 8192}
    assert at.normalised_device_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert at.normalised_device_name(GPU_NAME) + ".json" == FILE_NAME


def test_nearest_entry_log2_distance():
    entries = [entry("select", {"id": "small"}, rows=1024, **SELECT_BUCKET),
               entry("select", {"id": "big"}, rows=65536, **SELECT_BUCKET),
               entry("unpack", {"id": "unpack"}, rows=2048, **SELECT_BUCKET),
               entry("select", {"id": "bf16"}, rows=2048, head_dim=128, dtype=torch.bfloat16)]
    key = lambda rows, **kw: at.bucket_of("select", rows=rows, **{**SELECT_BUCKET, **kw})  # noqa: E731
    assert at.nearest_entry(entries, "select", key(1024)) == {"id": "small"}      # exact
    assert at.nearest_entry(entries, "select", key(3000)) == {"id": "small"}      # 4096: 2 vs 4
    assert at.nearest_entry(entries, "select", key(20000)) == {"id": "big"}       # 32768: 5 vs 1
    assert at.nearest_entry(entries, "select", key(10**7)) == {"id": "big"}
    assert at.nearest_entry(entries, "select", key(1, dtype=torch.bfloat16)) == {"id": "bf16"}
    assert at.nearest_entry(entries, "select", key(1024, head_dim=64)) is None   # categorical must match
    assert at.nearest_entry(entries, "unpack", at.bucket_of("unpack", rows=1, **SELECT_BUCKET)) == {"id": "unpack"}
    assert at.nearest_entry([], "select", key(1024)) is None


def test_nearest_entry_sums_distances_over_numeric_keys():
    entries = [entry("decode", {"id": "a"}, batch_heads=8, context=65536, **DECODE_BUCKET),
               entry("decode", {"id": "b"}, batch_heads=512, context=4096, **DECODE_BUCKET),
               entry("decode", {"id": "c"}, batch_heads=8, context=65536, **{**DECODE_BUCKET, "group": 8})]
    key = lambda bh, ctx: at.bucket_of("decode", batch_heads=bh, context=ctx, **DECODE_BUCKET)  # noqa: E731
    assert at.nearest_entry(entries, "decode", key(8, 65536)) == {"id": "a"}
    assert at.nearest_entry(entries, "decode", key(16, 32768)) == {"id": "a"}    # 1+1 vs 5+3
    assert at.nearest_entry(entries, "decode", key(256, 8192)) == {"id": "b"}    # 5+3 vs 1+1
    assert at.nearest_entry(entries, "decode", key(128, 16384)) == {"id": "b"}   # 4+2 vs 2+2


def test_config_space_respects_tile_limits():
    small = at.config_space("select", head_dim=128)
    big = at.config_space("select", head_dim=256)
    assert len(small) == 12 and all(set(c) == {"BLOCK_T", "num_warps", "num_stages"} for c in small)
    assert not any(c["BLOCK_T"] == 128 and c["num_warps"] < 4 for c in big) and len(big) < len(small)
    dec = at.config_space("decode", **DECODE_BUCKET)
    assert dec and all({"BLOCK_N", "num_warps", "num_stages", "num_splits", "SLOTS"} <= set(c)
                       for c in dec if c.get("kernel") != "gluon")
    with pytest.raises(KeyError):
        at.config_space("nope")


# ------------------------------------------------------------------------------------------------
# Shipped files
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:mustafar_triton. no tuned:RuntimeWarning")
def test_shipped_exact_and_nearest_bucket(gpu):
    write_file(gpu.shipped_file, [
        entry("select", {"BLOCK_T": 16, "num_warps": 2, "num_stages": 1}, rows=1024, **SELECT_BUCKET),
        entry("select", {"BLOCK_T": 128, "num_warps": 8, "num_stages": 1}, rows=65536, **SELECT_BUCKET),
    ])
    assert at.config_for("select", CUDA, rows=1000, **SELECT_BUCKET)["BLOCK_T"] == 16
    assert at.config_for("select", CUDA, rows=65536, **SELECT_BUCKET)["BLOCK_T"] == 128
    assert at.config_for("select", CUDA, rows=20000, **SELECT_BUCKET)["BLOCK_T"] == 128
    assert at.config_for("select", CUDA, rows=3000, **SELECT_BUCKET)["BLOCK_T"] == 16
    # no entry with matching categorical keys: heuristic (no run given, so no tuning)
    other = dict(head_dim=64, dtype=torch.float16, rows=1024)
    assert at.config_for("select", CUDA, **other) == heuristic("select", **other)


def untuned_warnings(caught):
    return [w for w in caught if "no tuned" in str(w.message)]


def test_untuned_shape_warns_once_per_shape(gpu):
    """No file: the heuristic default, and one warning per shape (not per bucket) saying how to
    tune it; a missing file itself is not worth a warning."""
    bench = FakeBench(gpu.monkeypatch, lambda cfg: 1.0)
    assert not gpu.shipped_file.exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET)
        at.config_for("select", CUDA, rows=1 << 20, **SELECT_BUCKET)          # same shape, other bucket
        decode = [at.config_for("decode", CUDA, run=bench.run, batch_heads=8, context=ctx, **DECODE_BUCKET)
                  for ctx in (1000, 5000, 70000)]                             # a context that grows
    assert cfg == heuristic("select", rows=1024, **SELECT_BUCKET)
    assert decode == [heuristic("decode", batch_heads=8, context=ctx, **DECODE_BUCKET) for ctx in (1000, 5000, 70000)]
    assert bench.calls == [] and not gpu.user_file.exists(), "nothing is tuned unless asked"
    ours = untuned_warnings(caught)
    assert len(ours) == 2 and all(issubclass(w.category, RuntimeWarning) for w in ours)
    select_msg, decode_msg = (str(w.message) for w in ours)
    assert "no tuned select config for head_dim=128 dtype=float16 on " + GPU_NAME in select_msg
    assert "`python -m mustafar_triton.tune --kernels select`" in select_msg
    assert "MUSTAFAR_TRITON_AUTOTUNE=1" not in select_msg                     # select does not tune on first use
    assert "decode config for head_dim=128 group=4 dtype=float16 capacity=40" in decode_msg
    assert "MUSTAFAR_TRITON_AUTOTUNE=1" in decode_msg and str(gpu.user_file) in decode_msg
    assert [w for w in caught if "mustafar_triton" in str(w.message)] == ours  # no warning about the file


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps([1, 2, 3]),
    json.dumps({"triton_version": triton.__version__, "entries": 5}),
    json.dumps({"triton_version": triton.__version__}),
], ids=["bad-json", "list", "entries-not-list", "no-entries"])
def test_corrupt_file_warns_once_and_falls_back(gpu, content):
    gpu.shipped_file.write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET)
        second = at.config_for("select", CUDA, rows=4096, **SELECT_BUCKET)
        fresh_process()  # even when the file is read again, the warning is not repeated
        at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET)
    ours = [w for w in caught if "corrupt autotune file" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert str(gpu.shipped_file) in str(ours[0].message)
    assert first == heuristic("select", rows=1024, **SELECT_BUCKET)
    assert second == heuristic("select", rows=4096, **SELECT_BUCKET)


def test_shipped_file_of_another_triton_is_used_with_one_warning(gpu):
    """The shipped files are tuned on the GPU machine's triton; a user on another version gets their
    configs (tile sizes and split counts), told once that they were tuned with another version."""
    tuned = {"BLOCK_T": 32, "num_warps": 8, "num_stages": 1}
    assert tuned != heuristic("select", rows=1024, **SELECT_BUCKET)
    write_file(gpu.shipped_file, [entry("select", tuned, rows=1024, **SELECT_BUCKET)], version="0.0.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET)
        fresh_process()
        second = at.config_for("select", CUDA, rows=4096, **SELECT_BUCKET)
    ours = [w for w in caught if "tuned with triton" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    message = str(ours[0].message)
    assert message.startswith("mustafar_triton: using") and "0.0.1" in message and triton.__version__ in message
    assert first == second == tuned


@pytest.mark.parametrize("revision", [None, at.GATHERS_REVISION - 1])
def test_gathers_chosen_before_they_changed_are_dropped_with_one_warning(gpu, revision):
    """A file tuned at an older gathers revision (or before the field) keeps its decode configs'
    split counts and other kernels' configs, but not the gathers it names: the launch policy picks
    those; one warning. The same file at the current revision keeps them."""
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    tuned = dict(kernel="gluon", BLOCK_N=16, num_warps=1, num_splits=-3, gather="walk_halves")
    select = {"BLOCK_T": 32, "num_warps": 8, "num_stages": 1}
    entries = [entry("decode", tuned, **bucket), entry("select", select, rows=1024, **SELECT_BUCKET)]
    write_file(gpu.shipped_file, entries, gathers_revision=revision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stale = at.config_for("decode", CUDA, **bucket)
        fresh_process()
        again = at.config_for("decode", CUDA, **bucket)
        other = at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET)
    ours = [w for w in caught if "chose decode gathers before they changed" in str(w.message)]
    assert len(ours) == 1 and str(gpu.shipped_file) in str(ours[0].message)
    assert stale == again == {k: v for k, v in tuned.items() if k != "gather"} and other == select
    fresh_process()
    write_file(gpu.shipped_file, entries)
    assert at.config_for("decode", CUDA, **bucket) == tuned


def test_written_files_record_the_gathers_revision(gpu):
    at.write_entries(gpu.user_file, [], CUDA)
    assert json.loads(gpu.user_file.read_text())["gathers_revision"] == at.GATHERS_REVISION


def test_user_cache_of_another_triton_is_tuned_again(gpu):
    """A user cache is this machine's own timing: after a triton upgrade its buckets are re-tuned
    when tuning is on (one warning) and the file is rewritten for the running version."""
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    stale = dict(BLOCK_N=64, num_warps=4, num_stages=1, num_splits=0, SLOTS="popc")
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    write_file(gpu.user_file, [entry("decode", stale, **bucket)], version="0.0.1")
    bench = FakeBench(gpu.monkeypatch, _decode_time)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = at.config_for("decode", CUDA, run=bench.run, **bucket)
    ours = [w for w in caught if "tuned with triton" in str(w.message)]
    assert len(ours) == 1 and str(ours[0].message).startswith("mustafar_triton: ignoring")
    assert best == min(at.config_space("decode", **bucket), key=_decode_time) != stale
    data = json.loads(gpu.user_file.read_text())
    assert data["triton_version"] == triton.__version__
    assert [e["config"] for e in data["entries"]] == [best]


def test_override_folder_via_env(gpu, tmp_path):
    other = tmp_path / "other"
    write_file(gpu.shipped_file, [entry("unpack", {"BLOCK_T": 16, "num_warps": 2, "num_stages": 1},
                                        rows=1024, **SELECT_BUCKET)])
    write_file(other / FILE_NAME, [entry("unpack", {"BLOCK_T": 64, "num_warps": 8, "num_stages": 1},
                                         rows=1024, **SELECT_BUCKET)])
    assert at.config_for("unpack", CUDA, rows=1024, **SELECT_BUCKET)["BLOCK_T"] == 16
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE_DIR", str(other))
    fresh_process()  # the folder is read when a bucket is first resolved in a process
    assert at.shipped_dir() == other
    assert at.config_for("unpack", CUDA, rows=1024, **SELECT_BUCKET)["BLOCK_T"] == 64
    gpu.monkeypatch.delenv("MUSTAFAR_TRITON_AUTOTUNE_DIR")
    assert at.shipped_dir() == at.REPO_CACHE_DIR


# ------------------------------------------------------------------------------------------------
# On-the-fly tuning and the user cache
# ------------------------------------------------------------------------------------------------
def _decode_time(cfg):
    # a known best: BLOCK_N=32, 2 stages, splits -2 (all in the space)
    return 1.0 + (cfg["BLOCK_N"] != 32) + 0.5 * (cfg.get("num_stages") != 2) + 0.25 * (cfg["num_splits"] != -2)


@pytest.mark.filterwarnings("ignore:mustafar_triton. tuning:RuntimeWarning")
def test_tune_on_request_writes_and_reads_user_cache(gpu):
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    bench = FakeBench(gpu.monkeypatch, _decode_time)
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    space = at.config_space("decode", **bucket)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = at.config_for("decode", CUDA, run=bench.run, **bucket)
    assert best == min(space, key=_decode_time)
    assert best["BLOCK_N"] == 32 and best["num_stages"] == 2 and best["num_splits"] == -2
    assert bench.configs_run() == {key_of(c) for c in space}, "every config of the space is timed"
    announced = [str(w.message) for w in caught if "mustafar_triton: tuning decode" in str(w.message)]
    assert len(announced) == 1 and "takes seconds" in announced[0] and str(gpu.user_file) in announced[0]
    assert untuned_warnings(caught) == []

    data = json.loads(gpu.user_file.read_text())
    assert data["triton_version"] == triton.__version__ and data["device"] == GPU_NAME
    assert data["entries"] == [{"kernel": "decode", "bucket": at.bucket_of("decode", **bucket), "config": best}]

    # the same bucket, and any other bucket of the shape (a growing context, another batch): the
    # user cache's nearest entry, nothing is run
    n = len(bench.calls)
    assert at.config_for("decode", CUDA, run=bench.run, **{**bucket, "context": 3000}) == best  # 4096 bucket
    assert at.config_for("decode", CUDA, run=bench.run, **{**bucket, "context": 100000}) == best
    assert at.config_for("decode", CUDA, run=bench.run, **{**bucket, "batch_heads": 3}) == best
    fresh_process()                                         # a new process reads the file from disk
    assert at.config_for("decode", CUDA, run=bench.run, **{**bucket, "context": 70000}) == best
    assert len(bench.calls) == n

    # another shape is tuned once and appended
    bench.time_of = lambda cfg: 1.0 + (cfg["BLOCK_N"] != 64)
    other = at.config_for("decode", CUDA, run=bench.run, **{**bucket, "group": 8})
    assert other["BLOCK_N"] == 64 and len(bench.calls) >= n + len(space)
    assert len(json.loads(gpu.user_file.read_text())["entries"]) == 2


def test_tuning_launches_no_gluon_config_where_gluon_cannot_run(gpu):
    """An unchecked triton or a GPU before Ampere (_gluon_compat.gluon_runs_on False): on-the-fly
    tuning times the tl configs only (a Gluon compile there could take the CUDA context down)."""
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    gpu.monkeypatch.setattr(at, "gluon_runs_on", lambda device: False)
    bench = FakeBench(gpu.monkeypatch, _decode_time)
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    assert any(c.get("kernel") == "gluon" for c in at.config_space("decode", **bucket))
    at.config_for("decode", CUDA, run=bench.run, **bucket)
    assert bench.calls and not [c for c in bench.calls if c.get("kernel") == "gluon"]
    assert bench.configs_run() == {key_of(c) for c in at.config_space("decode", **bucket)
                                   if c.get("kernel") != "gluon"}


@pytest.mark.filterwarnings("ignore:mustafar_triton. tuning:RuntimeWarning")
def test_tune_skips_failing_configs_and_raises_when_none_runs(gpu):
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    def time_of(cfg):
        if cfg["BLOCK_T"] == 16:
            raise RuntimeError("out of shared memory")
        return cfg["BLOCK_T"] + cfg["num_warps"] / 10
    bench = FakeBench(gpu.monkeypatch, time_of)
    best = at.config_for("select", CUDA, run=bench.run, rows=1024, **SELECT_BUCKET)
    assert best == {"BLOCK_T": 32, "num_warps": 2, "num_stages": 1}

    best, timings = at.tune("select", bench.run, {}, [{"BLOCK_T": 64, "num_warps": 4}, {"BLOCK_T": 32, "num_warps": 8}])
    assert best == {"BLOCK_T": 32, "num_warps": 8} and len(timings) == 2
    with pytest.raises(RuntimeError, match="no config of select ran"):
        at.tune("select", bench.run, {"rows": 1}, [{"BLOCK_T": 16, "num_warps": 4}])


def test_shipped_file_beats_user_cache(gpu):
    shipped_cfg = {"BLOCK_T": 16, "num_warps": 2, "num_stages": 1}
    user_cfg = {"BLOCK_T": 128, "num_warps": 8, "num_stages": 1}
    write_file(gpu.user_file, [entry("select", user_cfg, rows=1024, **SELECT_BUCKET)])
    assert at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET) == user_cfg
    write_file(gpu.shipped_file, [entry("select", shipped_cfg, rows=1 << 20, **SELECT_BUCKET)])
    fresh_process()
    assert at.config_for("select", CUDA, rows=1024, **SELECT_BUCKET) == shipped_cfg  # even a far bucket


def test_no_tuning_unless_requested_disabled_tracing_or_no_run(gpu):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _no_tuning_unless_requested(gpu)
    assert len(untuned_warnings(caught)) == 1, "one warning per shape, with or without run"


def _no_tuning_unless_requested(gpu):
    bench = FakeBench(gpu.monkeypatch, lambda cfg: 1.0)
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    assert at.config_for("decode", CUDA, run=bench.run, **bucket) == heuristic("decode", **bucket)  # not asked
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "0")
    write_file(gpu.shipped_file, [entry("decode", {"BLOCK_N": 16}, **bucket)])
    assert at.config_for("decode", CUDA, run=bench.run, **bucket) == heuristic("decode", **bucket)
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    gpu.shipped_file.unlink()
    fresh_process()
    gpu.monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert at.config_for("decode", CUDA, run=bench.run, **bucket) == heuristic("decode", **bucket)
    gpu.monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gpu.monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert at.config_for("decode", CUDA, run=bench.run, **bucket) == heuristic("decode", **bucket)
    gpu.monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert at.config_for("decode", CUDA, run=None, **bucket) == heuristic("decode", **bucket)
    assert bench.calls == [] and not gpu.user_file.exists()


@pytest.mark.filterwarnings("ignore:mustafar_triton. tuning:RuntimeWarning")
def test_heuristic_during_capture_is_not_final(gpu):
    gpu.monkeypatch.setenv("MUSTAFAR_TRITON_AUTOTUNE", "1")
    bench = FakeBench(gpu.monkeypatch, lambda cfg: 1.0 + (cfg["BLOCK_T"] != 128) + cfg["num_warps"] / 100)
    bucket = dict(rows=1024, **SELECT_BUCKET)
    gpu.monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert at.config_for("select", CUDA, run=bench.run, **bucket) == heuristic("select", **bucket)
    gpu.monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuned = at.config_for("select", CUDA, run=bench.run, **bucket)  # first call outside capture
    assert tuned == {"BLOCK_T": 128, "num_warps": 2, "num_stages": 1}
    assert gpu.user_file.exists()


def test_interpreter_and_cpu_always_use_heuristic(gpu):
    bench = FakeBench(gpu.monkeypatch, lambda cfg: 1.0)
    bucket = dict(rows=1024, **SELECT_BUCKET)
    write_file(gpu.shipped_file, [entry("select", {"BLOCK_T": 16, "num_warps": 2, "num_stages": 1}, **bucket)])
    assert at.config_for("select", torch.device("cpu"), run=bench.run, **bucket) == \
        at.heuristic_config("select", torch.device("cpu"), **bucket)
    gpu.monkeypatch.setattr(at, "interpreting", lambda: True)
    cfg = at.config_for("select", CUDA, run=bench.run, **bucket)
    assert cfg == at.heuristic_config("select", CUDA, **bucket) and cfg["BLOCK_T"] != 16
    assert bench.calls == []


def test_user_cache_default_location(monkeypatch):
    monkeypatch.delenv("MUSTAFAR_TRITON_USER_CACHE", raising=False)
    monkeypatch.setattr(at, "device_name", lambda device: GPU_NAME)
    path = at.user_cache_path(CUDA)
    assert path.name == FILE_NAME and path.parent.name == "mustafar_triton" and ".cache" in path.parts


# ------------------------------------------------------------------------------------------------
# Files shipped in the repository
# ------------------------------------------------------------------------------------------------
_SHIPPED = sorted(at.REPO_CACHE_DIR.glob("*.json"))


@pytest.mark.parametrize("path", _SHIPPED or [pytest.param(None, marks=pytest.mark.skip(reason="no tuned files shipped yet"))],
                         ids=lambda p: getattr(p, "name", "none"))
def test_shipped_files_are_valid(path):
    data = json.loads(path.read_text())
    # tuned on the GPU machine, with a triton the Gluon kernels are checked on; other versions use
    # the file too (test_shipped_file_of_another_triton_is_used_with_one_warning)
    assert triton_minor_version(data["triton_version"]) in GLUON_CHECKED_VERSIONS, data["triton_version"]
    assert data["entries"]
    for e in data["entries"]:
        exact, numeric = at.BUCKET_KEYS[e["kernel"]]
        assert set(e["bucket"]) == set(exact) | set(numeric)
        space = at.config_space(e["kernel"], **{**e["bucket"], "head_dim": int(e["bucket"]["head_dim"]),
                                                "group": int(e["bucket"].get("group", 1))})
        optional = {"maxnreg", "merge_warps", "prefetch"}  # launch keys with defaults (older files lack them)
        required = set.intersection(*(set(c) for c in space)) - optional
        allowed = set.union(*(set(c) for c in space)) | optional
        assert required <= set(e["config"]) <= allowed, e


def test_forced_config_applies_to_one_kernel_and_is_restored():
    cpu = torch.device("cpu")
    forced = dict(BLOCK_N=16, num_warps=2, num_stages=1, num_splits=3, SLOTS="lut")
    select_before = at.config_for("select", cpu, rows=64, **SELECT_BUCKET)
    with at.forced_config("decode", forced):
        assert at.config_for("decode", cpu, batch_heads=8, context=100, **DECODE_BUCKET) == forced
        assert at.config_for("select", cpu, rows=64, **SELECT_BUCKET) == select_before
    assert at.config_for("decode", cpu, batch_heads=8, context=100, **DECODE_BUCKET) != forced


# ------------------------------------------------------------------------------------------------
# python -m mustafar_triton.tune: final comparison with the default, merging into the device file
# ------------------------------------------------------------------------------------------------
def test_tune_bucket_keeps_the_default_unless_the_tuned_config_beats_it(gpu):
    from mustafar_triton import tune
    bucket = dict(batch_heads=64, context=4000, **DECODE_BUCKET)
    default = heuristic("decode", **bucket)
    rival = next(c for c in at.config_space("decode", **bucket) if c != default)
    # the rival's first timing is lucky (1.0); every later one is slower than the default's
    timed_rival = []

    def time_of(cfg):
        if cfg != rival:
            return 1.5
        timed_rival.append(cfg)
        return 1.0 if len(timed_rival) == 1 else 2.0
    bench = FakeBench(gpu.monkeypatch, time_of)
    call = lambda: bench.run(at.config_for("decode", CUDA, **bucket))  # what a launch under tuning does
    r = tune.tune_bucket("decode", bucket, call, CUDA)
    assert r["config"] == default and r["best_ms"] == r["default_ms"] == 1.5
    # a rival faster in every timing is kept
    bench.time_of = lambda cfg: 1.0 if cfg == rival else 1.5
    r = tune.tune_bucket("decode", bucket, call, CUDA)
    assert r["config"] == rival and (r["best_ms"], r["default_ms"]) == (1.0, 1.5)


def test_tune_save_merges_into_the_device_file(gpu, tmp_path):
    from mustafar_triton import tune
    path = gpu.shipped_file
    kept = entry("select", dict(BLOCK_T=32, num_warps=4, num_stages=1), rows=4096, **SELECT_BUCKET)
    replaced = entry("unpack", dict(BLOCK_T=16, num_warps=4, num_stages=1), rows=4096, **SELECT_BUCKET)
    write_file(path, [kept, replaced])
    new = dict(kernel="unpack", bucket=replaced["bucket"], config=dict(BLOCK_T=64, num_warps=2, num_stages=1))
    report = tmp_path / "report.json"
    tune.save([new], path, CUDA, str(report))
    entries = json.loads(path.read_text())["entries"]
    assert sorted(map(key_of, entries)) == sorted(map(key_of, [new, kept]))
    assert json.loads(report.read_text())["rows"] == [new]


def test_gluon_splits_fill_whole_waves():
    """num_splits=-k with programs_per_sm: the largest split count whose grid fits k waves (a
    grid one program past a wave nearly doubled the time on the H100)."""
    from mustafar_triton.kernels.decode import choose_num_splits
    from mustafar_triton.kernels.decode_gluon_launch import programs_per_sm, shared_bytes
    per_sm = programs_per_sm(128, 8, "popc")
    assert per_sm == 12                      # 168 registers per thread: 3 warps per scheduler
    assert programs_per_sm(128, 8, "walk") == 16      # 128 registers: 4 per scheduler
    assert programs_per_sm(128, 8, "walk_halves") == 20   # 96: 5 per scheduler
    assert programs_per_sm(64, 8, "walk") == 20       # 96: 5 per scheduler (not 65536 // 3072 = 21)
    assert programs_per_sm(128, 16, "popc") == 8      # 224: 2 per scheduler (not 65536 // 7168 = 9)
    # the staged gathers' shared memory: 16 walk programs fit 228 KB up to 14.25 KB each; rows of
    # 128 bytes (capacity 64) are staged 144 bytes apart, of 192 bytes 208 apart
    h100_shared = 228 << 10
    # (and the run-start table: 32 rows of 4 bytes at D=128; the zero slot, 16 bytes)
    assert shared_bytes("walk", 128, 64, 64) == 2 * (2 * 16 * 144 + 2 * 16 * 16) + 32 * 4 + 16 + 1024
    assert programs_per_sm(128, 8, "walk", shared_bytes("walk", 128, 88, 88), h100_shared) == 16
    assert programs_per_sm(128, 8, "walk", shared_bytes("walk", 128, 96, 96), h100_shared) == 15
    assert programs_per_sm(128, 8, "walk", shared_bytes("walk", 128, 120, 120), h100_shared) == 13
    assert programs_per_sm(128, 8, "walk", shared_bytes("walk", 128, 128, 128), h100_shared) == 11  # 12 before the table
    # the scatter adds the dense tiles and queues: 18080 bytes at D=128 K0.7V0.7, as ptxas reports
    assert shared_bytes("scatter", 128, 40, 40) == 18080
    assert programs_per_sm(128, 8, "scatter", shared_bytes("scatter", 128, 40, 40), h100_shared) == 12
    # 14 scatter programs of 15776 bytes fit (capacity 16), but the 4 schedulers would get 4, 4, 3, 3
    # warps: the plan is 12; below 12 (11 at capacity 56) what fits; the walk keeps what fits (15 above)
    assert shared_bytes("scatter", 128, 16, 16) == 15776 and h100_shared // 15776 == 14
    assert programs_per_sm(128, 8, "scatter", shared_bytes("scatter", 128, 16, 16), h100_shared) == 12
    assert h100_shared // shared_bytes("scatter", 128, 56, 56) == 11
    assert programs_per_sm(128, 8, "scatter", shared_bytes("scatter", 128, 56, 56), h100_shared) == 11
    assert programs_per_sm(64, 8, "scatter", shared_bytes("scatter", 64, 16, 16), h100_shared) == 20
    assert shared_bytes("popc", 128, 40, 40) == 0
    # walk_halves adds q^T (D x 8 query rows x 2 bytes): 20 programs fit at capacity 40, 17 at 64
    assert shared_bytes("walk_halves", 128, 40, 40) == shared_bytes("walk", 128, 40, 40) + 2048 == 9360
    assert programs_per_sm(128, 8, "walk_halves", shared_bytes("walk_halves", 128, 40, 40), h100_shared) == 20
    assert programs_per_sm(128, 8, "walk_halves", shared_bytes("walk_halves", 128, 64, 64), h100_shared) == 17
    for batch_heads in (8, 32, 128, 512, 2048):
        for waves in (1, 2, 3):
            splits = choose_num_splits(-waves, 132, batch_heads, 1 << 20, 16, per_sm)
            full = waves * per_sm * 132          # programs in `waves` whole waves
            assert splits == max(1, min(512, full // batch_heads))
            assert splits == 512 or splits * batch_heads <= max(batch_heads, full) < (splits + 1) * batch_heads
    assert choose_num_splits(-1, 132, 128, 16384, 16, per_sm) == 12      # B=16 Llama-3-8B: 1584 programs
    assert choose_num_splits(-1, 132, 128, 100, 16, per_sm) == 2         # >= 4 tiles per split
    assert choose_num_splits(5, 132, 128, 16384, 16, per_sm) == 5        # explicit counts are kept
    assert choose_num_splits(-2, 132, 128, 16384, 64) == 5               # the tl kernel: >= 4 programs per SM


def test_gluon_gather_choice():
    """Without a "gather" key: the scatter for caches of few stored values (capacity <= D / 16), else
    the walk, unless their splits would be short (the popcount gather has fewer fixed costs per split); a config's
    explicit gather wins where it supports the shape, and popc runs where nothing else does."""
    from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG, MIN_STAGED_SPLIT_TOKENS, choose_gather

    def gather(cfg, d, caps, context, splits):
        return choose_gather(cfg, d, caps[0], caps[1], context, lambda g: splits)
    assert gather(GLUON_CONFIG, 128, (64, 64), 16384, 16) == "walk"        # B=16: 1024 tokens per split
    assert gather(GLUON_CONFIG, 128, (64, 64), 32768, 264) == "walk"       # B=1: 124 per split
    assert gather(GLUON_CONFIG, 128, (64, 64), 8192, 264) == "popc"        # 31 per split
    assert gather(GLUON_CONFIG, 128, (8, 8), 16384, 16) == "scatter"       # few values stored (0.95)
    assert gather(GLUON_CONFIG, 128, (8, 16), 16384, 16) == "walk"         # V at 0.9: the walk since 35d1ce4
    assert gather(GLUON_CONFIG, 128, (16, 24), 16384, 16) == "walk"        # V at sparsity 0.85
    assert gather(GLUON_CONFIG, 128, (40, 40), 16384, 16) == "walk"        # 0.7: walk_halves only when named
    assert gather(dict(GLUON_CONFIG, gather="walk_halves"), 128, (40, 40), 16384, 16) == "walk_halves"
    assert gather(GLUON_CONFIG, 128, (16, 16), 8192, 264) == "popc"
    assert gather(GLUON_CONFIG, 256, (16, 16), 16384, 16) == "walk"        # the scatter: D 64 / 128
    assert gather(GLUON_CONFIG, 128, (64, 64), MIN_STAGED_SPLIT_TOKENS * 3, 3) == "walk"
    assert gather(GLUON_CONFIG, 128, (64, 64), MIN_STAGED_SPLIT_TOKENS * 3 - 1, 3) == "popc"
    assert gather(dict(GLUON_CONFIG, gather="walk"), 64, (16, 16), 100, 50) == "walk"
    assert gather(dict(GLUON_CONFIG, gather="scatter"), 128, (64, 64), 100, 50) == "scatter"
    assert gather(dict(GLUON_CONFIG, gather="popc"), 128, (16, 16), 16384, 16) == "popc"
    assert gather(dict(GLUON_CONFIG, gather="walk"), 32, (16, 16), 16384, 16) == "popc"     # D=32: popc only
    assert gather(dict(GLUON_CONFIG, gather="scatter"), 256, (16, 16), 16384, 16) == "popc"
    assert gather(dict(GLUON_CONFIG, BLOCK_N=32, gather="walk"), 128, (40, 40), 16384, 16) == "popc"
    # 16 query rows (Lq * G): the walk down to capacity 3 D / 16 where its splits are long enough
    assert choose_gather(GLUON_CONFIG, 128, 40, 40, 16384, lambda g: 8, block_h=16) == "walk"     # 2048 per split
    assert choose_gather(GLUON_CONFIG, 128, 64, 64, 16384, lambda g: 8, block_h=16) == "walk"
    assert choose_gather(GLUON_CONFIG, 128, 32, 24, 16384, lambda g: 8, block_h=16) == "walk"
    assert choose_gather(GLUON_CONFIG, 128, 24, 24, 16384, lambda g: 8, block_h=16) == "scatter"  # 0.85
    assert choose_gather(GLUON_CONFIG, 128, 40, 40, 32768, lambda g: 132, block_h=16) == "scatter"  # B=1: 248
    assert choose_gather(GLUON_CONFIG, 128, 40, 40, 384 * 132, lambda g: 132, block_h=16) == "walk"
    assert choose_gather(GLUON_CONFIG, 128, 40, 40, 384 * 132 - 1, lambda g: 132, block_h=16) == "scatter"
    assert choose_gather(GLUON_CONFIG, 128, 40, 40, 32768, lambda g: 132, block_h=8) == "walk"    # 8 rows: no limit
    assert choose_gather(GLUON_CONFIG, 256, 64, 64, 16384, lambda g: 16, block_h=16) == "walk"
    assert choose_gather(GLUON_CONFIG, 256, 16, 16, 32768, lambda g: 132, block_h=16) == "walk"   # no scatter at D=256


def test_fp8_gather_choice():
    """fp8 values run the walk, or walk_halves where a config names it and it runs (D 128 / 256, 8
    padded rows)."""
    from mustafar_triton.kernels.decode_gluon_launch import fp8_gather
    assert fp8_gather(None, 128, 8) == "walk"
    assert fp8_gather("scatter", 128, 8) == "walk"               # a gather with no fp8 form
    assert fp8_gather("popc", 64, 8) == "walk"
    assert fp8_gather("walk", 128, 8) == "walk"
    assert fp8_gather("walk_halves", 128, 8) == "walk_halves"
    assert fp8_gather("walk_halves", 256, 8) == "walk_halves"
    assert fp8_gather("walk_halves", 128, 16) == "walk"          # 16 rows: the halves' 96 registers do not fit
    assert fp8_gather("walk_halves", 64, 8) == "walk"            # D=64: no walk_halves


def test_decode_default_is_the_gluon_kernel_where_it_runs():
    from mustafar_triton.kernels.decode import decode_heuristic_config
    from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG
    bucket = dict(head_dim=128, group=4, capacity=40, batch_heads=128, context=16384)
    assert decode_heuristic_config(132, False, dtype=torch.float16, **bucket) == GLUON_CONFIG
    assert decode_heuristic_config(132, False, dtype="bfloat16", **bucket) == GLUON_CONFIG
    for dtype, interp in ((torch.float32, False), (torch.float16, True)):
        assert decode_heuristic_config(132, interp, dtype=dtype, **bucket).get("kernel") is None
    assert decode_heuristic_config(132, False, dtype=torch.float16, **dict(bucket, group=32)).get("kernel") is None
    assert any(c.get("kernel") == "gluon" for c in at.config_space("decode", dtype="float16", **bucket))
    assert not any(c.get("kernel") == "gluon" for c in at.config_space("decode", dtype="float32", **bucket))
