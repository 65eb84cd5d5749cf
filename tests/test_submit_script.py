"""`lmforge submit`'s batch script keeps every byte of every value inside its argument (no cluster).

Scripts come from `lmforge submit --dry-run` run in this process (and, once, from a real submit
to a stub sbatch). Over a hand-written list of hostile strings and seeded random ones, placed
where a user puts text (the command after `--`, config overrides such as name=, runs_dir= and
data.path=, --name, --out-dir, the working directory, the profile's fields), every script:

- passes `bash -n` and has as many lines as the script of plain values (no value adds a line);
- keeps every #SBATCH line before its first command, and holds exactly the directives the
  profile asks for, read the way sbatch reads them (see `sbatch_arguments`);
- run by bash with stub `srun` / `scontrol` on PATH that record their argv NUL-separated, hands
  srun exactly the user's arguments, byte for byte, from the right working directory;
- runs nothing a value smuggled in: no canary file appears.

A value that an #SBATCH line cannot hold (a line break in a job name or a log directory, a
backslash in a log directory) must be refused with one line instead. A last test sends a stop
signal to the batch shell at chosen moments (a DEBUG trap through BASH_ENV) and checks that the
training always gets it, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmforge.launcher.cli import _parser, main
from lmforge.launcher.commands import load_command_config
from lmforge.launcher.slurm import SlurmProfile, submit
from lmforge.pretrain.config.schema import load_config
from lmforge.pretrain.core.errors import ConfigurationError
from tests.conftest import REPO

DEMO = os.path.join(REPO, "configs", "pretrain", "demo.yaml")
LOCAL = os.path.join(REPO, "configs", "slurm", "local.yaml")
JOB_ID, TASK_ID, NODE_ADDR = "4242", "7", "10.1.2.3"

# The stubs record what they were given, byte for byte: argv NUL-separated, the working
# directory, the stop signal in the environment and the signals received.
SRUN = r"""#!/bin/bash
rec=$LMFORGE_TEST_RECORD
got=''
trap 'got="$got${got:+ }USR1"' USR1
trap 'got="$got${got:+ }TERM"' TERM
printf '%s\0' "$@" > "$rec.argv"
printf '%s' "$PWD" > "$rec.pwd"
printf '%s' "${LMFORGE_STOP_SIGNAL-}" > "$rec.env"
: > "$rec.ready"
if [ -n "${LMFORGE_TEST_SLEEP-}" ]; then sleep "$LMFORGE_TEST_SLEEP" & wait $!; fi
printf '%s' "$got" > "$rec.got"
exit 0
"""
SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=node1" ;;
  *) printf '%s\0' "$@" >> "$LMFORGE_TEST_RECORD.scontrol" ;;
esac
"""
SBATCH = r"""#!/bin/bash
printf '%s\0' "$@" > "$LMFORGE_TEST_RECORD.sbatch"
cp -- "${@: -1}" "$LMFORGE_TEST_RECORD.script"
echo 4242
"""


@dataclasses.dataclass
class Env:
    root: str
    bin: str
    canary_dir: str
    record: str

    @property
    def canary(self) -> str:
        return os.path.join(self.canary_dir, "pwned")


@pytest.fixture
def env(tmp_path) -> Env:
    bin_dir, canary_dir = tmp_path / "bin", tmp_path / "canary"
    bin_dir.mkdir()
    canary_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return Env(str(tmp_path), str(bin_dir), str(canary_dir), str(tmp_path / "rec"))


# --- hostile strings ---------------------------------------------------------------------------


def hand_written(canary: str) -> list[str]:
    """Strings that broke or could break a generated script (no NUL: argv cannot hold one)."""
    t = f"touch {canary}"
    return [
        "",
        " ",
        "two words",
        "a\nb",
        f"a\n{t} #",
        f"x\r\n{t}\r\n",
        "\r",
        "\n",
        "'",
        '"',
        f"'; {t}; '",
        f'"; {t}; "',
        f"$({t})",
        f"`{t}`",
        f"; {t}",
        f"& {t} &",
        f"| {t}",
        f"&& {t} ||",
        f"> {canary}",
        "#",
        f"# comment\n{t}",
        "\\",
        "\\n",
        f"\\\n{t}",
        "${HOME}",
        "$HOME",
        "$'\\n'",
        f"$'\\n'{t}",
        "-",
        "--",
        "-x",
        "--nproc",
        "--help",
        "-m",
        "=",
        "~",
        "~root/x",
        "*",
        "?",
        "[a]",
        "{a,b}",
        "!!",
        "#SBATCH --time=1",
        f"#SBATCH --wrap={t}",
        f"\n#SBATCH --wrap='{t}'\n",
        "EOF",
        f"EOF\n{t}\nEOF",
        f"<<'EOF'\n{t}\nEOF\n",
        "\t",
        "\x0b\x0c",
        "\x01\x02\x1f\x7f",
        "\x1b[31mred\x1b[0m",
        "données",
        "中文",
        "\U0001f600 non-BMP",
        "\u2028\u0085",
        "\ufeffbom",
        "e\u0301",
        "\udcff",  # an argument that was not UTF-8: the byte 0xff
        "\udc80abc\udcfe",
        "a" * 5000,
        ("\n" + t) * 50,
        "%j %% %A_%a",
        "a/b/../c",
        "hetjob packjob",
    ]


PIECES = [  # (no NUL: argv cannot hold one)
    "\n", "\r", "\t", "'", '"', "\\", "`", "$(", ")", "${", "}", "$'", ";", "&", "|", "#", " ",
    "#SBATCH ", "EOF", "<<", "-", "--", "*", "~", "!", "%", "é", "\U0001f600", "\u2028",
]  # fmt: skip


def random_strings(rng: random.Random, canary: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 12)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(PIECES))
            elif kind < 0.55:
                parts.append(chr(rng.choice([rng.randrange(1, 0x20), rng.randrange(0x20, 0x7F),
                                             0x7F, rng.randrange(0x80, 0x800)])))  # fmt: skip
            elif kind < 0.65:
                parts.append(chr(0xDC80 + rng.randrange(0x80)))  # a byte that is not UTF-8
            elif kind < 0.75:
                parts.append(f"touch {canary}")
            else:
                parts.append("".join(rng.choices("abcxyz019_=./", k=rng.randrange(1, 6))))
        out.append("".join(parts))
    return out


# --- rendering and running ---------------------------------------------------------------------


def lmforge_in_process(*argv: str) -> tuple[int, bytes, str]:
    """`lmforge ARGV` in this process: exit code, stdout as bytes, stderr."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
        out.flush()
    return code, out.buffer.getvalue(), err.getvalue()


def render(profile: SlurmProfile, command: list[str], **kwargs) -> bytes:
    """`submit(..., dry_run=True)` of a profile object: the script's bytes."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    with contextlib.redirect_stdout(out):
        submit(profile, command=command, dry_run=True, **kwargs)
        out.flush()
    return out.buffer.getvalue()


def sbatch_arguments(rest: bytes) -> list[bytes]:
    """The arguments of one #SBATCH line as sbatch (SLURM 22.05, src/sbatch/opt.c) reads them:
    whitespace separates, ' or " group, a backslash takes the next byte literally, an unquoted #
    ends the line; an argument that collects nothing ends the line too."""
    space, out, i, n = b" \t\n\r\x0b\x0c", [], 0, len(rest)
    while True:
        while i < n and rest[i] in space:
            i += 1
        if i >= n:
            return out
        arg, quote, escaped, copied = bytearray(), 0, False, False
        while i < n and (quote or rest[i] not in space):
            c = rest[i]
            if escaped:
                escaped = False
            elif c == ord("\\"):
                escaped, i = True, i + 1
                continue
            elif quote:
                if c == quote:
                    quote, i = 0, i + 1
                    continue
            elif c in b"\"'":
                quote, i = c, i + 1
                continue
            elif c == ord("#"):
                break
            arg.append(c)
            copied, i = True, i + 1
        assert not quote, f"sbatch would stop: unmatched quote in {rest!r}"
        if not copied:
            return out
        out.append(bytes(arg))


def directives(script: bytes) -> list[bytes]:
    """What sbatch takes from the script: #SBATCH lines until the first command (a line whose
    first non-blank character is not #). Fails if an #SBATCH line comes after a command."""
    found, command_seen = [], False
    for line in script.split(b"\n"):
        if line.startswith(b"#SBATCH"):
            assert not command_seen, f"#SBATCH after the first command: {line[:200]!r}"
            found += sbatch_arguments(line[len(b"#SBATCH") :])
        elif line.lstrip(b" \t\r\x0b\x0c")[:1] not in (b"", b"#"):
            command_seen = True
    return found


def printable(name: str) -> str:
    return "".join(c if c.isprintable() else "_" for c in name) or "lmforge"


def expected_directives(
    profile: SlurmProfile, *, job_name: str, log_dir: str, array: bool
) -> list[bytes]:
    """The directives a profile asks for, as sbatch should read them."""
    log = os.path.join(log_dir.replace("%", "%%"), "slurm-%A_%a.out" if array else "slurm-%j.out")
    want = [
        f"--job-name={job_name}",
        f"--nodes={profile.nodes}",
        "--ntasks-per-node=1",
        f"--time={profile.time}",
        f"--output={log}",
        "--open-mode=append",
        f"--signal=B:USR1@{profile.signal_grace}",
        "--requeue" if profile.requeue else "--no-requeue",
        *profile.sbatch,
    ]
    for flag, value in (
        ("--partition", profile.partition),
        ("--account", profile.account),
        ("--qos", profile.qos),
        ("--cpus-per-task", profile.cpus_per_node),
        ("--gpus-per-node", profile.gpus_per_node),
        ("--mem", profile.mem),
    ):
        if value:
            want.append(f"{flag}={value}")
    return sorted(os.fsencode(w) for w in want)


def run_script(
    env: Env, script: bytes, *, record: str | None = None, locale: str = "C.UTF-8", extra_env=None
) -> int:
    """Run the script with the stubs on PATH, as SLURM would start it; return its exit code.
    The stubs write their records to ``record``.* (default: env.record)."""
    record = record or env.record
    for suffix in ("argv", "pwd", "env", "got", "ready", "scontrol"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{record}.{suffix}")
    path = f"{record}.sbatch"
    with open(path, "wb") as f:
        f.write(script)
    run_env = {
        "PATH": f"{env.bin}:{os.environ['PATH']}",
        "HOME": env.root,
        "LC_ALL": locale,
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_ARRAY_TASK_ID": TASK_ID,
        "LMFORGE_TEST_RECORD": record,
        **(extra_env or {}),
    }
    proc = subprocess.run(["bash", path], env=run_env, capture_output=True, timeout=30)
    return proc.returncode


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def srun_argv(record: str) -> list[bytes]:
    data = read(f"{record}.argv")
    assert data.endswith(b"\0")
    return data[:-1].split(b"\0")


class Checker:
    """The checks every rendered script must pass. Scripts are rendered one after the other
    (some in another working directory) and checked by :meth:`finish`, a few at a time."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.cases = 0
        self.n_refused = 0
        self.jobs: list[tuple[bytes, dict]] = []

    def no_canary(self, what: str) -> None:
        assert not os.listdir(self.env.canary_dir), f"a value ran a command: {what}"

    def script(self, script: bytes, **expect) -> None:
        self.cases += 1
        self.jobs.append((script, expect))

    def refusal(self, code: int, err: str, *, expect: str) -> None:
        self.cases += 1
        self.n_refused += 1
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1, (code, err[-500:])
        assert expect in lines[0], lines[0]

    def finish(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(self._check, range(len(self.jobs)), *zip(*self.jobs, strict=True)))
        self.no_canary("(all cases)")
        self.jobs.clear()

    def _check(
        self,
        i: int,
        script: bytes,
        expect: dict,
    ) -> None:
        lines, want_directives = expect["lines"], expect["want_directives"]
        python, nproc, argv, workdir = (
            expect["python"], expect["nproc"], expect["argv"], expect["workdir"]
        )  # fmt: skip
        what = repr(argv)[:300]
        check = subprocess.run(["bash", "-n"], input=script, capture_output=True)
        assert check.returncode == 0 and not check.stderr, f"bash -n: {check.stderr!r} {what}"
        assert script.count(b"\n") == lines, f"a value added lines to the script: {what}"
        assert sorted(directives(script)) == want_directives, what
        record = f"{self.env.record}{i}"
        code = run_script(self.env, script, record=record, locale=expect.get("locale", "C.UTF-8"))
        self.no_canary(what)
        assert code == 0, f"the script exited {code}: {what}"
        got = srun_argv(record)
        head = [
            b"--kill-on-bad-exit=1", b"--ntasks-per-node=1", os.fsencode(python),
            b"-m", b"lmforge.launcher.cli", b"launch", b"--nproc", str(nproc).encode(),
            b"--master-addr", NODE_ADDR.encode(),
            b"--master-port", str(20000 + int(JOB_ID) % 20000).encode(), b"--",
        ]  # fmt: skip
        assert got[: len(head)] == head, what
        assert got[len(head) :] == [os.fsencode(a) for a in argv], what
        # ... and `lmforge launch` reads back the same command.
        args, _ = _parser().parse_known_args([os.fsdecode(a) for a in got[5:]])
        assert args.cmd[1:] == argv, what
        assert read(f"{record}.pwd") == os.fsencode(workdir), what
        assert read(f"{record}.env") == b"", what


def with_index(arg: str) -> str:
    return arg.replace("{index}", TASK_ID)


def test_every_value_of_a_command_stays_in_its_argument(env, monkeypatch):
    """The arguments of the command after `--` (also in arrays, with {index}), --name and the
    working directory: hand-written and random strings."""
    rng = random.Random(20240613)
    checker = Checker(env)
    profile = load_config(SlurmProfile, [LOCAL])
    strings = hand_written(env.canary) + random_strings(rng, env.canary, 30)
    workdirs = [os.path.join(env.root, d) for d in ("plain", "odd $(x) `y` 'q' \"d\"; é\n\\")]
    for d in workdirs:
        os.mkdir(d)
    out_dir = os.path.join(env.root, "logs")
    plain = None
    for i, s in enumerate(strings):
        workdir = workdirs[i % 2]
        monkeypatch.chdir(workdir)
        array = i % 3 == 0
        others = rng.sample(strings, 2)
        command = ["consolidate", s, "--out", others[0], *([f"{others[1]}{{index}}"] * array)]
        name = rng.choice([None, s, others[1]]) if i % 4 == 1 else None
        argv = ["submit", LOCAL, "--dry-run", "--out-dir", out_dir]
        argv += ["--array", "0-9"] if array else []
        argv += [f"--name={name}"] if name is not None else []  # = : a name may start with -
        code, script, err = lmforge_in_process(*argv, "--", *command)
        name = _parser().parse_known_args(argv)[0].name  # as argparse took it (--name=-- is None)
        if name is not None and "\n" in name:
            checker.refusal(code, err, expect="line break")
            continue
        assert code == 0, err
        job_name = name or printable("consolidate-array" if array else "consolidate")
        if plain is None:
            plain = script.count(b"\n")
        checker.script(
            script,
            lines=plain,
            want_directives=expected_directives(
                profile, job_name=job_name, log_dir=out_dir, array=array
            ),
            python=sys.executable,
            nproc=1,
            argv=[with_index(a) for a in command] if array else command,
            workdir=workdir,
            locale="C.UTF-8" if i % 2 else "C",
        )
    checker.finish()
    assert checker.cases == len(strings) and checker.n_refused < len(strings) // 4


def yaml_quoted(value: str) -> str:
    """``value`` in YAML single quotes (what a careful user writes after key=)."""
    return "'" + value.replace("'", "''") + "'"


def test_training_overrides_and_paths_stay_in_their_arguments(env, monkeypatch):
    """name=, runs_dir= and data.path= of a training command (bare or YAML-quoted), and
    --out-dir: they also make the log directory and the job name (#SBATCH lines), which must hold
    them or be refused in one line."""
    rng = random.Random(7)
    checker = Checker(env)
    profile = load_config(SlurmProfile, [LOCAL])
    strings = hand_written(env.canary)[::3] + random_strings(rng, env.canary, 6)
    workdir = os.path.join(env.root, "work 'dir' $(x)")
    os.mkdir(workdir)
    monkeypatch.chdir(workdir)
    plain, accepted = None, 0
    for i, s in enumerate(strings):
        key = ("name", "data.path", "runs_dir")[i % 3]
        value = yaml_quoted(s) if i % 2 else s
        command = ["pretrain", DEMO, f"{key}={value}", "seed=3"]
        out_dir = os.path.join(env.root, "logs", s.replace("/", "_")) if i % 5 == 0 else None
        try:
            run_dir = load_command_config("pretrain", command[1:]).run_dir
        except ConfigurationError:  # the config refuses it (e.g. a control character that YAML
            # does not take): so must submit, in one line
            code, _, err = lmforge_in_process("submit", LOCAL, "--dry-run", "--", *command)
            checker.refusal(code, err, expect="")
            continue
        log_dir = os.path.abspath(out_dir or os.path.join(run_dir, "slurm"))
        # (the data is not there: only the arguments are the point here)
        argv = ["submit", LOCAL, "--dry-run", "--no-preflight"]
        argv += [f"--out-dir={out_dir}"] if out_dir else []
        code, script, err = lmforge_in_process(*argv, "--", *command)
        if "\n" in log_dir or "\\" in log_dir:
            checker.refusal(code, err, expect="log directory")
            continue
        assert code == 0, err
        accepted += 1
        if plain is None:
            plain = script.count(b"\n")
        checker.script(
            script,
            lines=plain,
            want_directives=expected_directives(
                profile,
                job_name=printable(os.path.basename(run_dir)),
                log_dir=log_dir,
                array=False,
            ),  # fmt: skip
            python=sys.executable,
            nproc=profile.procs,
            argv=[*command, "resume=auto"],
            workdir=workdir,
        )
    checker.finish()
    assert accepted >= len(strings) // 3, f"only {accepted} of {len(strings)} accepted"
    assert checker.n_refused, "no log directory or config was refused"


def test_profile_fields_stay_in_their_arguments(env, monkeypatch):
    """partition, account, qos, mem, extra sbatch options and python: any text in an #SBATCH
    line reads back as itself; a line break there is refused in one line."""
    rng = random.Random(99)
    checker = Checker(env)
    monkeypatch.chdir(env.root)
    strings = hand_written(env.canary) + random_strings(rng, env.canary, 20)
    out_dir = os.path.join(env.root, "logs")
    for i, s in enumerate(strings):
        pick = [s, *rng.sample(strings, 5)]
        rng.shuffle(pick)
        profile = SlurmProfile(
            partition=pick[0] or None,
            account=pick[1] or None,
            qos=pick[2] or None,
            mem=pick[3] or None,
            nodes=1 + i % 3,
            gpus_per_node=i % 2,
            cpus_per_node=(i % 4) or None,
            requeue=bool(i % 2),
            sbatch=[f"--comment={pick[4]}", "--exclusive", f"--constraint={pick[5]}"],
            python=os.path.join(env.root, "bin dir", s.replace("/", "_")[:200]),
        )
        command = ["consolidate", pick[5], "--out", pick[0]]
        fields = [pick[0], pick[1], pick[2], pick[3], pick[4], pick[5]]
        if any("\n" in f for f in fields):
            with pytest.raises(ConfigurationError, match="line break") as raised:
                render(profile, command, out_dir=out_dir)
            checker.cases += 1
            checker.n_refused += 1
            assert "\n" not in str(raised.value).strip()
            continue
        script = render(profile, command, out_dir=out_dir)
        plain = render(
            dataclasses.replace(
                profile,
                **{k: getattr(profile, k) and "x" for k in ("partition", "account", "qos", "mem")},
                sbatch=["--comment=x", "--exclusive", "--constraint=x"],
                python="python",
            ),
            ["consolidate", "x", "--out", "x"],
            out_dir=out_dir,
        )
        checker.script(
            script,
            lines=plain.count(b"\n"),
            want_directives=expected_directives(
                dataclasses.replace(profile, nodes=1, nproc_per_node=1),
                job_name="consolidate",
                log_dir=out_dir,
                array=False,
            ),
            python=profile.python,
            nproc=1,  # consolidate: one process
            argv=command,
            workdir=env.root,
        )
    checker.finish()
    assert checker.cases == len(strings)
    # Extra options are options: one per entry.
    for bad in ("exclusive", "--", "a --b"):
        with pytest.raises(ConfigurationError, match="one option"):
            render(SlurmProfile(sbatch=[bad]), ["consolidate", "x"], out_dir=out_dir)
    with pytest.raises(ConfigurationError, match="interpreter"):
        render(SlurmProfile(python="-c"), ["consolidate", "x"], out_dir=out_dir)


def test_profile_file_values_reach_sbatch_exactly(env, tmp_path, monkeypatch):
    """The same through a profile file and the CLI (values that YAML keeps as they are)."""
    import yaml

    monkeypatch.chdir(env.root)
    checker = Checker(env)
    out_dir = os.path.join(env.root, "logs")
    for s in hand_written(env.canary)[1::3]:
        if "\n" in s or "${" in s or not s.strip() or any(0xDC80 <= ord(c) < 0xDD00 for c in s):
            continue
        path = tmp_path / "profile.yaml"
        fields = {"partition": s, "account": s, "sbatch": [f"--comment={s}"]}
        path.write_text(yaml.safe_dump(fields, allow_unicode=True))
        profile = load_config(SlurmProfile, [str(path)])
        if (profile.partition, profile.account, profile.sbatch) != (s, s, [f"--comment={s}"]):
            continue  # changed by YAML itself: not this test's subject
        code, script, err = lmforge_in_process(
            "submit", str(path), "--dry-run", "--out-dir", out_dir, "--", "consolidate", s
        )
        assert code == 0, err
        checker.script(
            script,
            lines=render(
                dataclasses.replace(profile, partition="x", account="x", sbatch=["--comment=x"]),
                ["consolidate", "x"],
                out_dir=out_dir,
            ).count(b"\n"),
            want_directives=expected_directives(
                profile, job_name="consolidate", log_dir=out_dir, array=False
            ),
            python=sys.executable,
            nproc=1,
            argv=["consolidate", s],
            workdir=env.root,
        )
    checker.finish()
    assert checker.cases > 10


def test_submit_writes_and_hands_sbatch_the_script_it_prints(env, monkeypatch, capsys):
    """A real submit (stub sbatch): the saved script is the one sbatch got, byte for byte, and
    it runs the command exactly; the messages are one line each whatever the command holds."""
    monkeypatch.chdir(env.root)
    monkeypatch.setenv("PATH", f"{env.bin}:{os.environ['PATH']}")
    monkeypatch.setenv("LMFORGE_TEST_RECORD", env.record)
    command = ["consolidate", f"a\n$(touch {env.canary})\n", "--out", "\udcff é 'x'"]
    out_dir = os.path.join(env.root, "logs %j 50%")
    assert main(["submit", LOCAL, "--out-dir", out_dir, "--", *command]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and out.startswith("submitted job 4242: lmforge consolidate $'a")
    saved = read(os.path.join(out_dir, "job-4242.sbatch"))
    assert saved == read(f"{env.record}.script")
    argv = read(f"{env.record}.sbatch")[:-1].split(b"\0")
    assert len(argv) == 2 and argv[0] == b"--parsable"
    profile = load_config(SlurmProfile, [LOCAL])
    assert sorted(directives(saved)) == expected_directives(
        profile, job_name="consolidate", log_dir=out_dir, array=False
    )
    assert b"--output=" + os.fsencode(out_dir.replace("%", "%%")) in b"".join(directives(saved))
    checker = Checker(env)
    checker.script(
        saved,
        lines=saved.count(b"\n"),
        want_directives=sorted(directives(saved)),
        python=sys.executable,
        nproc=1,
        argv=command,
        workdir=env.root,
    )
    checker.finish()


def test_setup_lines_are_code_and_are_checked(env, monkeypatch):
    """`setup` holds shell lines by design (multi-line ones too): they run after every #SBATCH
    line; a set-up that bash cannot read is refused in one line before anything is submitted."""
    monkeypatch.chdir(env.root)
    profile = SlurmProfile(
        setup=["f() {\n  echo set-up ran\n}", "f", "export X='#SBATCH --time=9'"], sbatch=["-v"]
    )
    script = render(profile, ["consolidate", "x"], out_dir=env.root)
    assert sorted(directives(script)) == expected_directives(
        profile, job_name="consolidate", log_dir=env.root, array=False
    )
    assert run_script(env, script) == 0 and srun_argv(env.record)[-2:] == [b"consolidate", b"x"]
    for bad in ('echo "unterminated', "cat <<EOF", "if true; then", "echo dos\r\necho x"):
        with pytest.raises(ConfigurationError, match="(does not parse|DOS).*setup") as raised:
            render(SlurmProfile(setup=[bad]), ["consolidate", "x"], out_dir=env.root)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
@pytest.mark.parametrize("moment", ["before srun", "while srun is forked", "after srun started"])
def test_a_stop_signal_is_never_lost(env, monkeypatch, sig, moment):
    """A stop signal reaching the batch shell at any moment reaches the training once: held
    before srun (its environment), sent to srun after; one that comes while bash forks srun
    (after the environment was fixed, before srun's pid is known) is sent as soon as the pid is
    known. srun that dies of it at once ends the script with 128 + the signal (138 requeues)."""
    monkeypatch.chdir(env.root)
    profile = load_config(SlurmProfile, [LOCAL])
    script = render(profile, ["consolidate", "x"], out_dir=env.root)
    # A DEBUG trap, run by the batch shell before each command, signals it at that moment.
    pattern = {
        "before srun": "echo*",
        "while srun is forked": "srun*",
        "after srun started": "wait*",
    }
    hook = os.path.join(env.root, "hook.sh")
    with open(hook, "w") as f:
        f.write(
            "case $0 in *.sbatch) ;; *) return ;; esac  # the batch shell only, not the stubs\n"
            "lmforge_test_hooked=''\n"
            "trap 'if [ -z \"$lmforge_test_hooked\" ]; then case $BASH_COMMAND in "
            f"{pattern[moment]}) lmforge_test_hooked=1; "
            + ('while [ ! -e "$LMFORGE_TEST_RECORD.ready" ]; do sleep 0.01; done; '
               if moment == "after srun started" else "")
            + f"kill -s {sig} $$ ;; esac; fi' DEBUG\n"
        )  # fmt: skip
    code = run_script(env, script, extra_env={"BASH_ENV": hook, "LMFORGE_TEST_SLEEP": "0.3"})
    requeued = os.path.exists(f"{env.record}.scontrol") and b"requeue" in read(
        f"{env.record}.scontrol"
    )
    if not os.path.exists(f"{env.record}.got"):  # srun died of the signal before its trap
        assert moment == "while srun is forked", f"srun died ({code}) {moment}"
        assert code == 128 + getattr(signal, f"SIG{sig}")
        assert requeued == (sig == "USR1")
        return
    env_sig, got = read(f"{env.record}.env").decode(), read(f"{env.record}.got").decode()
    assert code == 0
    if moment == "before srun":
        assert (env_sig, got) == (sig, ""), "held: in the environment, not sent again"
    else:
        assert (env_sig, got) == ("", sig), f"got {got!r}, environment {env_sig!r}"
