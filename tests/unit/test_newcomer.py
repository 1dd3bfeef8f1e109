"""What a newcomer hits: every command tells the truth in one line, and no check passes
that checked nothing. Failures of the file system are real: a store made unreadable
(or read-only) with chmod, and, where the tests run as root, commands run without the
capabilities that let root ignore file permissions."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfn.cli import main, parser
from modelfn.packaging.bundle import Packaged, describe
from modelfn.packaging.limits import Artifact
from modelfn.store import LocalStore
from modelfn.store.local import FILE_MODE
from tests.conftest import MODELFN, ROOT, free_port, load_event, start, stop
from tests.unit.test_api_handler import fresh_api, invoke


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run so that file permissions apply to it: as root, without the
    capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, the permission tests need setpriv (util-linux)"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", *argv]


def cli(*args: str, cwd: Path | None = None, privileged: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*MODELFN, *args]
    return subprocess.run(argv if privileged else unprivileged(argv), capture_output=True,
                          text=True, timeout=300, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with exit 2 and one line on stderr holding ``needles``."""
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfn: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def locked(store_copy: Path) -> Iterator[Path]:
    """The built store, unreadable by anyone who honours its permissions."""
    store_copy.chmod(0)
    yield store_copy
    store_copy.chmod(0o755)


# --- checks that check nothing -------------------------------------------------------------

@pytest.mark.parametrize("build_dir", ["does-not-exist", None])
def test_package_check_with_nothing_built_fails(tmp_path: Path, build_dir: str | None) -> None:
    args = ["package-check"] + (["--build-dir", build_dir] if build_dir else [])
    result = cli(*args, cwd=tmp_path)  # an empty folder: no .aws-sam/build there
    one_line(result, "nothing built at", "ApiFunction", "make sam-build")


def test_package_check_refuses_a_runtime_layer_without_native_libraries(tmp_path: Path) -> None:
    for name in ("ApiFunction", "RuntimeLayer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_text("")
    one_line(cli("package-check", "--build-dir", str(tmp_path)), "no native library")


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["models"],
                                     ["promote", "digits-cnn", "1"],
                                     ["batch", "events/api-infer.json", "--model", "m"]])
def test_read_commands_refuse_a_store_that_is_not_there(tmp_path: Path,
                                                        command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    one_line(cli(*command, "--store", str(missing)), f"no store at {missing}")
    assert not missing.exists()


@pytest.mark.slow
def test_write_commands_create_the_store_and_say_so(tmp_path: Path) -> None:
    result = cli("train", "digits-cnn", "--epochs", "1", "--quiet", "--store",
                 str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert f"(a new store, created at {tmp_path / 'new'})" in result.stdout
    (run,) = (tmp_path / "new/runs/digits-cnn").iterdir()
    again = cli("train", "digits-cnn", "--epochs", "1", "--quiet", "--store",
                str(tmp_path / "new"), "--run-id", run.name)  # a run id that is taken
    one_line(again, f"run {run.name!r} of digits-cnn already exists")
    assert "trained" not in again.stdout


def test_a_read_only_store_is_refused_before_training_or_exporting(store_copy: Path) -> None:
    store_copy.chmod(0o555)
    try:
        for command in (["train", "digits-cnn"], ["build", "digits-cnn"]):
            result = cli(*command, "--store", str(store_copy), privileged=False)
            one_line(result, "cannot write", str(store_copy), "Permission denied")
            # refused before the work, not after it: nothing trained nor exported
            assert "trained" not in result.stdout and "exporting" not in result.stdout
            assert "epoch" not in result.stderr and "parity" not in result.stdout
    finally:
        store_copy.chmod(0o755)


def test_a_server_with_no_model_is_not_ready(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    api = fresh_api(tmp_path, monkeypatch)
    status, body = invoke(api, load_event("api-health-ready"))
    assert status == 503 and body["ready"] is False and "no model" in body["error"]


_UNREADABLE = r"""
import json, sys
from modelfn.local.apigw import load_function
from modelfn.local.lambda_context import LocalContext
api = load_function("api")
out = {}
for name in sys.argv[1:]:
    r = api.lambda_handler(json.load(open(name)), LocalContext())
    out[name.rsplit("/", 1)[-1]] = [r["statusCode"], json.loads(r["body"])]
print(json.dumps(out))
"""


def test_an_unreadable_store_is_503_on_every_route(locked: Path) -> None:
    events = [str(ROOT / f"events/{e}.json") for e in (
        "api-health-ready", "api-models", "api-model-metadata", "api-infer")]
    proc = subprocess.run(unprivileged([sys.executable, "-c", _UNREADABLE, *events]),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODELFN_STORE": str(locked)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: status for name, (status, _) in answers.items()} == dict.fromkeys(
        ["api-health-ready.json", "api-models.json", "api-model-metadata.json",
         "api-infer.json"], 503)
    assert all("Permission denied" in body["error"] for _, body in answers.values())


@pytest.mark.parametrize("command", [["models"], ["promote", "digits-cnn", "1"], ["batch"]])
def test_an_unreadable_store_is_one_line_for_commands(locked: Path, tmp_path: Path,
                                                      command: list[str]) -> None:
    if command == ["batch"]:
        lines = tmp_path / "in.jsonl"
        lines.write_text(json.dumps({"id": "a", "inputs": [0] * 64}) + "\n")
        command = ["batch", str(lines), "--model", "digits-cnn", "--quiet"]
    one_line(cli(*command, "--store", str(locked), privileged=False), "cannot",
             "Permission denied")


# --- user mistakes: one line, exit 2 ---------------------------------------------------------

_DIGITS = """[models.d]
source = "torch"
module = "model.py:build"
inputs = [{ name = "image", datatype = "FP32", shape = [-1, 1, 8, 8] }]
checkpoint = "weights.pt"
"""


@pytest.mark.parametrize(("text", "argv", "needles"), [
    (None, ["build"], ["name one model to build, or --all"]),
    (None, ["build", "nope"], ["no model 'nope'", "digits-cnn, minilm, textcls"]),
    (None, ["build", "--all", "--version", "3"], ["not with --all"]),
    (None, ["build", "d", "--config", "missing.toml"], ["project file", "missing.toml",
                                                         "not found"]),
    ("[models.d\n", ["build", "d"], ["modelfn.toml: not valid TOML"]),
    ("[model.d]\nsource = 'onnx'\n", ["build", "d"], ["unknown table or key 'model'"]),
    (_DIGITS + "colour = 'red'\n", ["build", "d"], ["[models.d] colour: unknown key",
                                                     "a torch model takes:"]),
    (_DIGITS + "eval = 'rows.jsonl'\n", ["build", "d"], ["[models.d] eval: rows.jsonl: no "
                                                          "such file"]),
    (_DIGITS.replace('"torch"', '"keras"'), ["build", "d"], ["[models.d] source: must be "
                                                             "one of"]),
    (_DIGITS + "atol = 'small'\n", ["build", "d"], ["[models.d] atol: must be"]),
])
def test_project_file_mistakes_are_one_line_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        text: str | None, argv: list[str], needles: list[str]) -> None:
    """GIVEN a ./modelfn.toml with a mistake (or none: the shipped examples) WHEN a
    command reads it THEN one line names the file, the [models.NAME] section and the
    key, before any store is made or any work is done."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text("")
    (tmp_path / "weights.pt").write_bytes(b"")
    if text is not None:
        (tmp_path / "modelfn.toml").write_text(text)
    assert main([*argv, "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_building_a_run_that_does_not_exist(built_store: Path) -> None:
    one_line(cli("build", "digits-cnn", "--run", "nosuchrun", "--store", str(built_store)),
             "no complete run 'nosuchrun' of digits-cnn", "its runs:")


@pytest.mark.slow
def test_a_malformed_run_id_is_a_usage_error(built_store: Path) -> None:
    one_line(cli("build", "digits-cnn", "--run", "../x", "--store", str(built_store)),
             "invalid run id")


@pytest.mark.parametrize("command", ["serve", "up"])
def test_a_port_out_of_range(built_store: Path, command: str) -> None:
    one_line(cli(command, "--port", "70000", "--store", str(built_store)), "0..65535")


def test_batch_into_an_unwritable_folder(built_store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"inputs": [0] * 64}) + "\n")
    one_line(cli("batch", str(lines), "--model", "digits-cnn", "--store", str(built_store),
                 "--output", str(folder / "out.jsonl"), "--quiet", privileged=False),
             "cannot write", "Permission denied")


_NO_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "sklearn", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from modelfn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["train", "digits-cnn"], ["build", "digits-cnn"]])
def test_commands_that_need_torch_name_the_extra(tmp_path: Path, command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, *command, "--store",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    one_line(result, "needs torch", "pip install 'modelfn[train]'")


def test_batch_runs_without_the_training_extras(built_store: Path, tmp_path: Path) -> None:
    """A plain install has no tqdm (it comes with [train]): batch runs without a bar."""
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "a", "inputs": [0] * 64}) + "\n")
    script = _NO_TORCH.replace('{"torch", "sklearn", "matplotlib"}',
                               '{"torch", "sklearn", "matplotlib", "tqdm"}')
    result = subprocess.run([sys.executable, "-c", script, "batch", str(lines), "--model",
                             "digits-cnn", "--store", str(built_store)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["predictions"] == 1


def test_pruning_a_model_that_is_not_torch_is_refused_before_the_export(
        built_store: Path) -> None:
    result = cli("build", "minilm", "--precision", "prune", "--store", str(built_store))
    one_line(result, "removes channels from a torch module")
    assert "exporting" not in result.stdout + result.stderr


# --- batch tells the truth about failed lines -------------------------------------------------

@pytest.mark.parametrize("good, bad, status", [(0, 2, "failed"), (1, 2, "partial")])
def test_batch_fails_when_lines_fail_unless_allowed(built_store: Path, tmp_path: Path,
                                                    good: int, bad: int, status: str) -> None:
    lines = tmp_path / "in.jsonl"
    rows = [{"id": f"g{i}", "inputs": [0] * 64} for i in range(good)]
    rows += [{"id": f"b{i}", "inputs": [1, 2, 3]} for i in range(bad)]
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["batch", str(lines), "--model", "digits-cnn", "--store", str(built_store), "--quiet"]
    result = cli(*base)
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == status and summary["errors"] == bad
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"batch: {bad} of {good + bad} lines failed")
    allowed = cli(*base, "--allow-errors")
    assert allowed.returncode == 0 and "accepted: --allow-errors" in allowed.stderr


def test_batch_without_a_model_mentions_the_model_option(built_store: Path,
                                                         tmp_path: Path) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "a", "inputs": [0] * 64}) + "\n")
    result = cli("batch", str(lines), "--store", str(built_store), "--allow-errors")
    assert result.returncode == 0
    (row,) = [json.loads(x) for x in (tmp_path / "in.predictions.jsonl").read_text()
              .splitlines()]
    assert "--model" in row["error"] and "inputs/<model>/" not in row["error"]


# --- files, parameters, next steps, help -------------------------------------------------------

def test_store_files_get_the_usual_mode(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("a/b.json", b"{}")
    with store.open_writer("c.jsonl") as out:
        out.write(b"x\n")
    umask = os.umask(0o022)
    os.umask(umask)
    for rel in ("a/b.json", "c.jsonl"):
        mode = stat.S_IMODE((tmp_path / rel).stat().st_mode)
        assert mode == FILE_MODE == 0o666 & ~umask, oct(mode)


@pytest.mark.parametrize("overrides, message", [
    (["SnapStart=true", "ProvisionedConcurrency=2"], "SnapStart with provisioned concurrency"),
    (["SnapStart=true"], "set PreloadModels"),
    (["MemorySize=abc"], "MemorySize='abc': must be a number"),
    (["MemorySize=64"], "MemorySize=64: must lie in 128..10240"),
    (["ApiAuth=JWT", "JwtIssuer=https://issuer.example"], "needs JwtAudience"),
    (["ModelAlias=a/b"], "must match"),
    (["Nope=1"], "no parameter 'Nope'"),
])
def test_deploy_parameters_check_the_template_rules_types_and_ranges(
        overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy-parameters", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_deploy_parameters_accept_what_the_template_accepts(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy-parameters", "SnapStart=true", "PreloadModels=digits-cnn",
                 "MemorySize=3008", "ApiAuth=JWT", "JwtIssuer=https://i.example",
                 "JwtAudience=a,b"]) == 0
    assert "SnapStart=true" in capsys.readouterr().out


def test_package_names_make_deploy_as_the_next_step(tmp_path: Path) -> None:
    bundle = Artifact("m/1", 1 << 20, 1 << 19, 2)
    for kind in ("layer", "image"):
        text = describe(Packaged(kind, tmp_path / "x", "m", "1", bundle, 100 << 20))
        assert "make deploy ENV=prod OVERRIDES=" in text and "sam deploy" not in text
        assert "MiB" in text and " MB" not in text


def _options() -> Iterator[tuple[str, argparse.Action]]:
    top = parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action


def test_every_option_has_help_text() -> None:
    found = list(_options())
    assert len(found) > 40
    missing = [f"{name} {action.dest}" for name, action in found if not action.help]
    assert missing == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import modelfn

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"modelfn {modelfn.__version__}\n"


# --- protocol details a client trips on ----------------------------------------------------------

@pytest.fixture(scope="module")
def served(built_store: Path) -> Iterator[int]:
    port = free_port()
    proc = start(["serve", "--store", str(built_store), "--quiet"], port)
    yield port
    stop(proc)


@pytest.mark.parametrize("path", ["/v2/", "/v2/health/ready/", "/v2/models/digits-cnn/",
                                  "/v2/models/digits-cnn/versions/1/ready/"])
def test_routes_take_a_trailing_slash(served: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served, timeout=10)
    conn.request("GET", path)
    assert conn.getresponse().status == 200


def _chunked(port: int, body: bytes, chunk: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    parts = (body[i:i + chunk] for i in range(0, len(body), chunk))
    conn.request("POST", "/v2/models/digits-cnn/infer", body=parts,
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_a_chunked_request_body_is_decoded(served: int) -> None:
    body = load_event("api-infer")["body"].encode()
    status, answer = _chunked(served, body, 97)
    assert status == 200 and {o["name"]: o["data"] for o in answer["outputs"]}["label"] == ["7"]


def test_a_chunked_request_body_over_the_gateway_quota_is_413(served: int) -> None:
    status, answer = _chunked(served, b" " * (10 * 1024 * 1024 + 1), 1 << 20)
    assert status == 413 and "10 MB" in answer["error"]


@pytest.mark.slow
def test_serve_with_s3_prints_the_environment_to_use_and_keeps_moto_quiet(
        built_store: Path) -> None:
    import boto3

    s3_port = free_port()
    proc = start(["serve", "--store", str(built_store), "--with-s3", "--s3-port",
                  str(s3_port), "--quiet"], free_port())
    try:
        time.sleep(0.5)
        env = {}
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while "AWS_ENDPOINT_URL" not in env and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.strip().startswith("export "):
                env = dict(item.split("=", 1) for item in line.split()[1:])
        assert "AWS_ENDPOINT_URL" in env, "serve --with-s3 printed no export line in 120 s"
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                          region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          aws_session_token=env["AWS_SESSION_TOKEN"])
        s3.put_object(Bucket="modelfn-local", Key="inputs/digits-cnn/f.jsonl",
                      Body=(json.dumps({"id": "a", "inputs": [0] * 64}) + "\n").encode())
        deadline = time.monotonic() + 180  # generous: a busy 2-core machine is slow
        while time.monotonic() < deadline:
            found = s3.list_objects_v2(Bucket="modelfn-local", Prefix="outputs/")
            if len(found.get("Contents", [])) == 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no output and summary in 180 s: {found.get('Contents')}")
        summary = json.loads(s3.get_object(Bucket="modelfn-local",
                                           Key="outputs/digits-cnn/f.summary.json")["Body"]
                             .read())
        assert summary["predictions"] == 1
    finally:
        out = stop(proc)
    assert "PUT /modelfn-local" not in out and "HTTP/1.1\" 200" not in out  # no request log
