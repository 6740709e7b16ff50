"""The plugin system: the factory, built-ins = entry points, registries, a third-party plugin
loaded through an entry point and used from the CLI, and every hook documented and exercised."""

import ast
import asyncio
import configparser
import importlib.metadata
import inspect
import json
import os
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from setuptools import find_packages

from wbc_batch import hookspecs, plugins
from wbc_batch.cli import build_cli
from wbc_batch.hookspecs import hookimpl
from wbc_batch.plugins import (BUILTINS, DISABLE_AUTOLOAD_ENV, PluginError, check_registries,
                               collect, describe_plugins, get_backends, get_plugin_manager,
                               get_report_writers, get_truth_readers)

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def hook_names():
    return sorted(name for name, f in vars(hookspecs).items()
                  if callable(f) and hasattr(f, "wbc_batch_spec"))


# --- the factory and packaging ---------------------------------------------------------------------

def test_fresh_manager_every_call():
    a, b = get_plugin_manager(autoload=False), get_plugin_manager(autoload=False)
    assert a is not b

    class Extra:
        @hookimpl
        def wbc_register_backends(self):
            return []

    a.register(Extra(), name="extra")
    assert a.get_plugin("extra") is not None and b.get_plugin("extra") is None


def test_builtins_are_the_setup_cfg_entry_points():
    lines = setup_cfg()["options.entry_points"]["wbc_batch"].strip().splitlines()
    entry_points = tuple(tuple(part.strip() for part in line.split("=")) for line in lines)
    assert entry_points == BUILTINS


def test_setup_cfg_installs_what_the_tests_import_at_module_level():
    # `pip install -e ".[test]" && python -m pytest` (README) in a fresh venv: from Python 3.12
    # a venv has no setuptools, and this file imports it, so it must be in the test extra
    def names(requirements: str) -> set:
        return {re.split(r"[<>=!~;\[ ]", line.strip())[0].lower().replace("_", "-")
                for line in requirements.splitlines() if line.strip()}

    declared = names(setup_cfg()["options"]["install_requires"]) | \
        names(setup_cfg()["options.extras_require"]["test"])
    dists = importlib.metadata.packages_distributions()
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"wbc_batch", "wbc_batch_plugins"}
    missing = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - local - set(sys.stdlib_module_names):
                if not {d.lower().replace("_", "-") for d in dists.get(top, ())} & declared:
                    missing.add(f"{path.name}: {top}")
    assert not missing


def test_every_builtin_is_registered_under_its_name():
    pm = get_plugin_manager(autoload=False)
    for name, module in BUILTINS:
        assert pm.get_plugin(name) is sys.modules[module]


def test_setup_cfg_lists_every_package():
    listed = set(setup_cfg()["options"]["packages"].split())
    found = set(find_packages(str(ROOT), include=["wbc_batch", "wbc_batch.*"]))
    assert found | {"wbc_batch_plugins"} == listed
    assert setup_cfg()["options"]["package_dir"].split() == ["wbc_batch_plugins", "=", "plugins"]


def test_registries_hold_the_builtins():
    pm = get_plugin_manager(autoload=False)
    assert {"torch", "onnx"} <= set(get_backends(pm))
    assert {"csv", "xlsx"} <= set(get_report_writers(pm))
    assert len(get_truth_readers(pm)) >= 1
    assert ("torch", "built-in (wbc_batch_plugins.torch_backend)") in describe_plugins(pm)


def test_backend_availability_never_raises():
    for name, backend in get_backends(get_plugin_manager(autoload=False)).items():
        usable, detail = backend.availability()
        assert isinstance(usable, bool) and isinstance(detail, str) and detail


def test_duplicate_names_are_an_error_naming_both():
    pm = get_plugin_manager(autoload=False)

    class Twin:
        name = "torch"

    class Dup:
        @hookimpl
        def wbc_register_backends(self):
            return [Twin()]

    pm.register(Dup(), name="dup")
    with pytest.raises(PluginError, match=r"two plugins offer a backend named 'torch': 'torch' and 'dup'"):
        get_backends(pm)


def test_a_plugin_failing_in_a_registration_hook_is_named():
    pm = get_plugin_manager(autoload=False)

    class Broken:
        @hookimpl
        def wbc_register_report_writers(self):
            raise RuntimeError("no licence key")

    pm.register(Broken(), name="broken")
    with pytest.raises(PluginError, match=r"plugin 'broken' failed in wbc_register_report_writers: "
                                          r"RuntimeError: no licence key"):
        get_report_writers(pm)


def test_a_plugin_calling_sys_exit_in_a_registration_hook_is_named():
    # before: SystemExit went past `except Exception` and ended wbc-batch without a word
    pm = get_plugin_manager(autoload=False)

    class Quitter:
        @hookimpl
        def wbc_register_backends(self):
            sys.exit(5)

    pm.register(Quitter(), name="quitter")
    with pytest.raises(PluginError, match=r"plugin 'quitter' failed in wbc_register_backends: "
                                          r"SystemExit: 5"):
        get_backends(pm)


def test_nameless_object_is_an_error():
    pm = get_plugin_manager(autoload=False)

    class Bad:
        @hookimpl
        def wbc_register_report_writers(self):
            return [object()]

    pm.register(Bad(), name="bad")
    with pytest.raises(PluginError, match="report writer without a name"):
        collect(pm, "wbc_register_report_writers", "report writer")


# --- entry points (simulated, as pluggy's own tests do) ---------------------------------------------

PLUGIN_SOURCE = '''
"""acme-wbc: a third party's wbc-batch plugin (a backend and a command)."""
import click
import numpy as np
from wbc_batch.hookspecs import hookimpl


class AcmeSession:
    device = "cpu"
    fallback_note = ""

    def segment(self, batch):
        out = np.zeros((batch.shape[0], 3) + batch.shape[2:], np.float32)
        out[:, 0] = 1.0  # everything is background
        return out

    def classify(self, batch):
        return np.zeros((len(batch), 5), np.float32)


class AcmeBackend:
    name = "acme"

    def availability(self):
        return True, "acme accelerator: simulated"

    def open(self, bundle, device):
        return AcmeSession()


@hookimpl
def wbc_register_backends():
    return [AcmeBackend()]


@click.command("acme-hello")
def hello():
    """Say hello from acme."""
    click.echo("hello from acme")


@hookimpl
def wbc_register_commands(cli):
    cli.add_command(hello)
'''


class FakeDist:
    """Just enough of an importlib.metadata.Distribution for pluggy."""

    def __init__(self, name, version, entry_points):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points
        self.files = ()


@pytest.fixture
def acme_installed(tmp_path, monkeypatch):
    (tmp_path / "acme_wbc_plugin.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    ep = importlib.metadata.EntryPoint(name="acme", value="acme_wbc_plugin", group="wbc_batch")
    other = importlib.metadata.EntryPoint(name="x", value="nonexistent_module", group="other_group")
    dists = [FakeDist("acme-wbc", "1.0", [ep, other])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    yield
    sys.modules.pop("acme_wbc_plugin", None)


def test_third_party_plugin_through_entry_point_used_from_cli(acme_installed, tmp_path, fake_bundle,
                                                             caplog):
    pm = get_plugin_manager()
    assert pm.get_plugin("acme") is sys.modules["acme_wbc_plugin"]
    assert ("acme", "acme-wbc 1.0") in describe_plugins(pm)
    runner = CliRunner()

    res = runner.invoke(build_cli(get_plugin_manager()), ["plugins"])
    assert res.exit_code == 0
    assert re.search(r"acme\s+acme-wbc 1.0", res.output)
    # which plugin offers it, so that a failure naming the backend leads to the plugin to switch off
    assert re.search(r"acme\s+usable\s+acme accelerator: simulated \(plugin acme\)\n", res.output)
    assert "(plugin torch" not in res.output and "(plugin onnx" not in res.output  # built-ins
    assert "acme-hello" in res.output

    res = runner.invoke(build_cli(get_plugin_manager()), ["acme-hello"])
    assert res.exit_code == 0 and res.output == "hello from acme\n"

    from conftest import standard_field, write_image

    write_image(tmp_path / "in" / "a.png", standard_field())
    out = tmp_path / "out"
    res = runner.invoke(build_cli(get_plugin_manager()),
                        ["run", str(tmp_path / "in"), "-o", str(out), "--backend", "acme",
                         "--model", str(fake_bundle), "--report", "csv", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "backend acme on cpu" in res.stderr
    assert (out / "images.csv").read_text(encoding="utf-8").splitlines()[1].startswith("a.png,ok")
    # run.json says which plugin, of which version, analysed it; and that its open() took no
    # thread count (before: threads 1 recorded as if applied, and nothing said)
    info = json.loads((out / "run.json").read_text())
    assert info["plugins"]["acme"] == "acme-wbc 1.0"
    assert info["plugins"]["torch"] == "built-in (wbc_batch_plugins.torch_backend)"
    assert info["parameters"]["threads"] == 1 and info["parameters"]["threads_applied"] is False
    assert "backend 'acme' takes no thread count: --threads 1 is not applied" in caplog.text


@pytest.mark.parametrize("value", ["1", "true", "YES", " True ", "on", "Y"])
def test_autoload_can_be_disabled(acme_installed, tmp_path, monkeypatch, fake_bundle, value):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    pm = get_plugin_manager()
    assert pm.get_plugin("acme") is None and pm.get_plugin("torch") is not None
    res = CliRunner().invoke(build_cli(pm), ["run", str(tmp_path), "-o", str(tmp_path / "o"),
                                             "--backend", "acme", "--model", str(fake_bundle)])
    assert res.exit_code == 2 and "unknown backend 'acme' (installed: onnx, torch)" in res.output


@pytest.mark.parametrize("value", ["0", "false", "No", "", "OFF", " n "])
def test_autoload_stays_on_when_the_variable_says_no(acme_installed, monkeypatch, value):
    # before: any non-empty value disabled autoload, so =0 and =false did the opposite
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    assert get_plugin_manager().get_plugin("acme") is sys.modules["acme_wbc_plugin"]


def test_autoload_variable_of_another_value_disables_as_it_did_and_warns_once(
        acme_installed, monkeypatch, caplog):
    # every non-empty value once disabled autoload: `disable` must not silently turn it back on
    monkeypatch.setattr(plugins, "_warned_values", set(), raising=False)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "disable")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        assert get_plugin_manager().get_plugin("acme") is None
        assert get_plugin_manager().get_plugin("acme") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{DISABLE_AUTOLOAD_ENV}='disable' is none of 1, true, yes, on, y "
                        "(disable) or 0, false, no, off, n, empty (keep on); taken as disable"]


def test_builtins_are_not_loaded_twice_through_their_entry_points(monkeypatch):
    eps = [importlib.metadata.EntryPoint(name=n, value=m, group="wbc_batch") for n, m in BUILTINS]
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: iter([FakeDist("wbc-batch", "0", eps)]))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    pm = get_plugin_manager()
    assert len(pm.get_plugins()) == len(BUILTINS)
    assert len(get_backends(pm)) == 2


def test_broken_plugin_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "broken_wbc_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    ep = importlib.metadata.EntryPoint(name="broken", value="broken_wbc_plugin", group="wbc_batch")
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: iter([FakeDist("broken-dist", "0.1", [ep])]))
    # before: "a 'wbc_batch' entry-point plugin failed to load", naming neither
    with pytest.raises(PluginError, match=r"plugin 'broken' \(broken_wbc_plugin, from broken-dist "
                                          rf"0.1\) cannot be loaded: ImportError: needs libfoo; .*"
                                          rf"{DISABLE_AUTOLOAD_ENV}=1"):
        get_plugin_manager()


BROKEN_SOURCES = {
    "import": "raise ImportError('needs libfoo')\n",
    "exit": "import sys\nsys.exit('no licence')\n",
    "hook_args": ("from wbc_batch.hookspecs import hookimpl\n\n@hookimpl\n"
                  "def wbc_image_done(result, index, total, extra):\n    pass\n"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_SOURCES))
def test_a_broken_plugin_is_left_out_and_listed_and_the_others_still_load(
        acme_installed, tmp_path, monkeypatch, kind):
    (tmp_path / f"broken_{kind}_plugin.py").write_text(BROKEN_SOURCES[kind])
    ep = importlib.metadata.EntryPoint(name="broken", value=f"broken_{kind}_plugin",
                                       group="wbc_batch")
    good = list(importlib.metadata.distributions())
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: iter([FakeDist("broken-dist", "0.1", [ep]), *good]))
    pm = get_plugin_manager(keep_broken=True)
    assert pm.get_plugin("broken") is None
    assert pm.get_plugin("acme") is sys.modules["acme_wbc_plugin"]  # loaded after the broken one
    ((name, reason),) = pm.broken
    assert name == "broken" and "broken-dist 0.1" in reason and "\n" not in reason
    assert all(impl.plugin_name != "broken" for caller in vars(pm.hook).values()
               for impl in caller.get_hookimpls())  # nothing of it left registered
    with pytest.raises(PluginError, match="plugin 'broken'"):
        get_plugin_manager()
    sys.modules.pop(f"broken_{kind}_plugin", None)


def test_with_a_broken_plugin_the_cli_lists_it_and_refuses_every_other_command(tmp_path):
    """A real installed distribution (a .dist-info on PYTHONPATH) whose module fails to import,
    through the console script: --help and `plugins` run, `run` stops with the reason."""
    import subprocess

    site = tmp_path / "site"
    info = site / "acme_broken-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[wbc_batch]\nacme = acme_broken_plugin\n")
    (site / "acme_broken_plugin.py").write_text("import libfoo_that_is_not_there\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    script = [sys.executable, "-c", "from wbc_batch.cli import main; main()"]

    def wbc(*args):
        return subprocess.run([*script, *args], capture_output=True, text=True, env=env,
                              timeout=120)

    res = wbc("--help")  # before: every command, --help too, stopped with exit code 2
    assert res.returncode == 0 and "run" in res.stdout
    res = wbc("plugins")
    assert res.returncode == 2
    assert re.search(r"acme\s+BROKEN: the 'wbc_batch' plugin 'acme' \(acme_broken_plugin, from "
                     r"acme-broken 2.0\) cannot be loaded: ModuleNotFoundError", res.stdout)
    # the rest is listed as before (a writer of a third party installed in the venv may be too)
    assert re.search(r"Report writers: (.+, )?csv, (.+, )?xlsx", res.stdout)
    res = wbc("run", str(tmp_path), "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and not (tmp_path / "out").exists()
    assert "plugin 'acme'" in res.stderr and "acme-broken 2.0" in res.stderr
    assert "Traceback" not in res.stderr and "wbc-batch plugins" in res.stderr
    env[DISABLE_AUTOLOAD_ENV] = "1"
    assert wbc("plugins").returncode == 0


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, version, {entry-point name: module source}): a distribution with
    `wbc_batch` entry points, found as `importlib.metadata.distributions` finds them."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    dists, modules = [], []

    def add(dist, version, sources):
        eps = []
        for name, source in sources.items():
            module = f"{re.sub(r'[^a-z]', '_', dist.lower())}_{name}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            modules.append(module)
            eps.append(importlib.metadata.EntryPoint(name=name, value=module, group="wbc_batch"))
        dists.append(FakeDist(dist, version, eps))

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(list(dists)))
    yield add
    for module in modules:
        sys.modules.pop(module, None)


WRITER_SOURCE = """
    from wbc_batch.hookspecs import hookimpl

    class Writer:
        name = "acme-json"

        def write(self, out_dir, tables):
            return []

    @hookimpl
    def wbc_register_report_writers():
        return [Writer()]
"""

COMMAND_FAULTS = {
    "raises": "raise RuntimeError('no licence')",
    "replaces": "cli.add_command(click.Command('run', callback=lambda: None))",
    "exits": "sys.exit(4)",
}


def _wbc(*args):
    return CliRunner().invoke(build_cli(), list(args))


def _listed_as_broken_and_every_other_command_refused(tmp_path, name, reason):
    """`plugins` lists every plugin, `name` as BROKEN with `reason`, and the registries and
    commands, with exit code 2; --help runs; `run` stops with the reason and writes nothing."""
    res = _wbc("plugins")
    assert res.exit_code == 2, res.output
    assert re.search(rf"{name}\s+BROKEN: {reason}", res.output), res.output
    assert "Report writers: " in res.output and "Commands: " in res.output
    line = next(l for l in res.output.splitlines() if "BROKEN" in l)
    assert DISABLE_AUTOLOAD_ENV in line
    assert _wbc("--help").exit_code == 0
    res = _wbc("run", str(tmp_path), "-o", str(tmp_path / "out"))
    assert res.exit_code == 2 and "wbc-batch plugins" in res.output
    assert re.search(reason, res.output) and not (tmp_path / "out").exists()
    return res


@pytest.mark.parametrize("fault", sorted(COMMAND_FAULTS))
def test_a_faulty_wbc_register_commands_is_listed_as_broken(install, tmp_path, fault):
    # before: --help and `plugins` too stopped with the error (or a traceback)
    install("acme-cmd", "1.0", {"acme": f"""
        import sys
        import click
        from wbc_batch.hookspecs import hookimpl

        @hookimpl
        def wbc_register_commands(cli):
            cli.add_command(click.Command("acme-hello", callback=lambda: None))
            {COMMAND_FAULTS[fault]}
    """, "acmejson": WRITER_SOURCE})
    reason = {"raises": r"plugin 'acme' failed in wbc_register_commands: RuntimeError: no licence",
              "replaces": r"plugin 'acme' replaces or removes the command 'run', which wbc-batch "
                          r"already has",
              "exits": r"plugin 'acme' failed in wbc_register_commands: SystemExit: 4"}[fault]
    _listed_as_broken_and_every_other_command_refused(tmp_path, "acme", reason)
    res = _wbc("plugins")
    assert "Report writers: acme-json (plugin acmejson), csv, xlsx" in res.output  # its other entries are listed
    commands = build_cli().commands
    assert "acme-hello" not in commands  # its commands are left out, the core's kept
    assert commands["run"].callback.__module__ == "wbc_batch.cli"


def test_two_distributions_with_one_entry_point_name_are_listed_as_broken(install, tmp_path):
    # before: PluginError while building the command line: --help and `plugins` could not run
    install("acme-a", "1.0", {"acme": WRITER_SOURCE})
    install("acme-b", "2.0", {"acme": WRITER_SOURCE, "csv": WRITER_SOURCE})
    _listed_as_broken_and_every_other_command_refused(
        tmp_path, "acme", r"two 'wbc_batch' plugins are named 'acme': acme-a and acme-b; rename one "
                          r"entry point, uninstall one, or set WBC_BATCH_DISABLE_PLUGINS=acme to "
                          r"start without it, or WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD=1 without any")
    assert re.search(r"csv\s+BROKEN: two 'wbc_batch' plugins are named 'csv': wbc-batch \(built in\) "
                     r"and acme-b", _wbc("plugins").output)
    pm = get_plugin_manager(keep_broken=True)
    assert pm.get_plugin("acme") is None and "acme-json" not in get_report_writers(pm)
    assert [name for name, _ in pm.broken] == ["acme", "csv"]
    assert pm.get_plugin("csv") is sys.modules["wbc_batch_plugins.csv_writer"]
    with pytest.raises(PluginError, match="two 'wbc_batch' plugins are named 'acme'"):
        get_plugin_manager()


def test_one_plugin_can_be_switched_off_by_name_and_the_others_still_load(
        install, tmp_path, monkeypatch, caplog):
    # before: one broken plugin stopped every command, and the only way out was to switch off
    # every third-party plugin, a lab's working report writer with it
    install("acme-broken", "2.0", {"acme": "raise ImportError('needs libfoo')\n"})
    install("acme-json", "1.0", {"acmejson": WRITER_SOURCE})
    res = _wbc("plugins")
    assert res.exit_code == 2
    assert "set WBC_BATCH_DISABLE_PLUGINS=acme to start without it" in res.output
    monkeypatch.setenv("WBC_BATCH_DISABLE_PLUGINS", "acme, csv nosuch")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        res = _wbc("plugins")
    assert res.exit_code == 0, res.output
    assert re.search(r"acme\s+switched off by WBC_BATCH_DISABLE_PLUGINS", res.output)
    assert "Report writers: acme-json (plugin acmejson), csv, xlsx" in res.output  # the other one, and the built-in
    assert "BROKEN" not in res.output
    assert ("names 'csv', a built-in plugin, which cannot be switched off; third-party plugins it "
            "names are switched off") in caplog.text  # the sentence was cut off
    assert "names 'nosuch', but no installed plugin has that name" in caplog.text
    pm = get_plugin_manager()
    assert pm.get_plugin("acme") is None and pm.get_plugin("csv") is not None
    assert "acme-json" in get_report_writers(pm)
    res = _wbc("run", str(tmp_path), "-o", str(tmp_path / "out"), "--report", "acme")
    assert res.exit_code == 2
    assert "unknown report writer 'acme'" in res.output
    assert "WBC_BATCH_DISABLE_PLUGINS switches off 'acme'" in res.output


def test_a_function_named_like_a_hook_but_not_marked_is_said(caplog):
    # pluggy ignores it without a word: a forgotten @hookimpl, or one with a misspelled name too
    module = types.ModuleType("acme_unmarked")
    exec(textwrap.dedent("""
        from wbc_batch.hookspecs import wbc_register_backends  # imported: not the plugin's own

        def wbc_register_report_writers():
            return []

        def wbc_register_report_writer():
            return []

        def wbc_helper_of_mine():
            return []
    """), module.__dict__)
    plugins._unmarked_warned.clear()
    pm = get_plugin_manager(autoload=False)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        pm.register(module, name="acme")
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "plugin acme_unmarked: wbc_register_report_writer (the hook is wbc_register_report_writers) "
        "is not marked @hookimpl, so wbc-batch never calls it",
        "plugin acme_unmarked: wbc_register_report_writers is not marked @hookimpl, so wbc-batch "
        "never calls it"]


def test_registries_are_collected_once_per_set_of_plugins(pm):
    # before: the command line's start-up check and the run each called every registration hook,
    # so a plugin's writer was made twice and the one checked was not the one used
    calls = []

    class Counting:
        @hookimpl
        def wbc_register_report_writers(self):
            calls.append(1)
            return [types.SimpleNamespace(name="counted", write=lambda out_dir, tables: [])]

    pm.register(Counting(), name="counting")
    first = get_report_writers(pm)["counted"]
    assert get_report_writers(pm)["counted"] is first and len(calls) == 1
    check_registries(pm)
    assert len(calls) == 1
    pm.register(types.SimpleNamespace(), name="another")  # a plugin more: collected again
    assert get_report_writers(pm)["counted"] is not first and len(calls) == 2
    pm.unregister(name="another")  # a plugin less: collected again
    assert get_report_writers(pm)["counted"] and len(calls) == 3
    pm.set_blocked("counting")  # unregisters it: gone from the registry
    assert "counted" not in get_report_writers(pm)


def test_a_third_party_name_clash_blames_the_third_party_whatever_its_hook_order(install):
    # before: a `trylast` implementation came first in pluggy's list, so the built-in csv was
    # named as the one offering a second "csv", and the third party's writer was kept
    install("acme-csv", "1.0", {"acme": """
        from wbc_batch.hookspecs import hookimpl

        class Csv:
            name = "csv"

            def write(self, out_dir, tables):
                return []

        @hookimpl(trylast=True)
        def wbc_register_report_writers():
            return [Csv()]
    """})
    pm = get_plugin_manager(keep_broken=True)
    assert [name for name, _ in pm.broken] == ["acme"]
    assert "offer a report writer named 'csv': 'csv' and 'acme'" in pm.broken[0][1]
    assert get_report_writers(pm)["csv"].__module__ == "wbc_batch_plugins.csv_writer"


#: a plugin's report writer, for the faults of registering it
LIS_WRITER = """
        class Lis:
            name = "lis"

            def write(self, out_dir, tables):
                return []
"""

REGISTRY_FAULTS = {
    "raises": ("""
        @hookimpl
        def wbc_register_report_writers():
            raise RuntimeError("no licence")
    """, r"plugin 'acme' failed in wbc_register_report_writers: RuntimeError: no licence"),
    "twice": ("""
        class Csv:
            name = "csv"

            def write(self, out_dir, tables):
                return []

        @hookimpl
        def wbc_register_report_writers():
            return [Csv()]
    """, r"two plugins offer a report writer named 'csv': 'csv' and 'acme'"),
    # before: found only when the writer was called, after the whole batch had been analysed
    "no_write": ("""
        class Lis:
            name = "lis"

            def export(self, out_dir, tables):
                return []

        @hookimpl
        def wbc_register_report_writers():
            return [Lis()]
    """, r"plugin 'acme' offers the report writer 'lis' without write\(\)"),
    "a_class": (LIS_WRITER + """
        @hookimpl
        def wbc_register_report_writers():
            return [Lis]
    """, r"plugin 'acme' offers the report writer 'lis' the class Lis, not an instance of it"),
    "nameless": ("""
        @hookimpl
        def wbc_register_truth_readers():
            return [object()]
    """, r"plugin 'acme' offers a truth reader without a name \(a builtins.object\)"),
    # before: "failed in wbc_register_report_writers: TypeError: 'Lis' object is not iterable",
    # as if the plugin had raised
    "one_not_a_list": (LIS_WRITER + """
        @hookimpl
        def wbc_register_report_writers():
            return Lis()
    """, r"plugin 'acme''s wbc_register_report_writers returned a acme_reg_acme.Lis, not a list of "
         r"report writers"),
    # before: a generator's body ran outside the check: a traceback, even from `plugins`
    "a_generator_that_raises": ("""
        @hookimpl
        def wbc_register_report_writers():
            yield {}["missing"]
    """, r"plugin 'acme' failed in wbc_register_report_writers: KeyError: 'missing'"),
    "a_dict": ("""
        @hookimpl
        def wbc_register_backends():
            return {"name": "fast"}
    """, r"plugin 'acme''s wbc_register_backends returned a builtins.dict, not a list of "
         r"backends"),
}


@pytest.mark.parametrize("fault", sorted(REGISTRY_FAULTS))
def test_a_faulty_registration_hook_is_listed_as_broken(install, tmp_path, fault):
    # before: `plugins` stopped with the error before listing the registries
    source, reason = REGISTRY_FAULTS[fault]
    install("acme-reg", "1.0", {"acme": "from wbc_batch.hookspecs import hookimpl\n"
                                        + textwrap.dedent(source)})
    res = _listed_as_broken_and_every_other_command_refused(tmp_path, "acme", reason)
    res = _wbc("plugins")
    assert "Report writers: csv, xlsx\n" in res.output  # the built-in csv, once
    assert re.search(r"torch\s+(NOT )?usable", res.output)  # the listing went on
    assert res.output.count("BROKEN") == 1


def test_with_autoload_switched_off_unknown_names_and_the_listing_say_so(acme_installed, tmp_path,
                                                                         fake_bundle, monkeypatch):
    # before: "unknown backend 'acme' (installed: onnx, torch)", not saying why
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    note = f"third-party plugins are switched off by {DISABLE_AUTOLOAD_ENV}"
    res = _wbc("plugins")
    assert res.exit_code == 0 and f"({note})" in res.output
    truth = tmp_path / "t.csv"
    truth.write_text("image,class\na.png,neutrophil\n")
    for args, unknown in ((["--backend", "acme"], "unknown backend 'acme' (installed: onnx, torch)"),
                          (["--report", "acme"], "unknown report writer 'acme' (installed: csv, "
                                                 "xlsx)"),
                          (["--truth", str(truth), "--truth-format", "acme"],
                           "unknown truth format 'acme' (installed: csv, voc, wbc_dataset, yolo)")):
        res = _wbc("run", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(fake_bundle),
                   *args)
        assert res.exit_code == 2 and f"{unknown}; {note}" in " ".join(res.output.split())
    # a truth no built-in reader recognises (with no --truth-format): a third party's may
    odd = tmp_path / "t.wbctruth"
    odd.write_text("a.png\tneutrophil\n")
    res = _wbc("run", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(fake_bundle),
               "--truth", str(odd))
    assert res.exit_code == 2 and "no truth reader recognises" in res.output
    assert note in " ".join(res.output.split())
    res = _wbc("acme-hello")  # a third party's command
    assert res.exit_code == 2 and f"No such command 'acme-hello'; {note}." in " ".join(res.output.split())
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    res = _wbc("run", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(fake_bundle),
               "--backend", "nope")
    assert res.exit_code == 2 and "switched off" not in res.output
    assert "switched off" not in _wbc("plugins").output


def test_misspelled_hook_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "typo_wbc_plugin.py").write_text(textwrap.dedent('''
        from wbc_batch.hookspecs import hookimpl

        @hookimpl
        def wbc_register_backend():   # missing the final "s"
            return []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    ep = importlib.metadata.EntryPoint(name="typo", value="typo_wbc_plugin", group="wbc_batch")
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: iter([FakeDist("typo", "0.1", [ep])]))
    with pytest.raises(PluginError, match="wbc_register_backend"):
        get_plugin_manager()
    sys.modules.pop("typo_wbc_plugin", None)


@pytest.mark.parametrize("value, suggestion", [
    ("idle_pkg", "the submodule that has them: 'idle_pkg.<submodule>'"),  # hooks in a submodule
    ("idle_pkg.writer:Writer", "not a report writer, backend or truth reader itself"),
])
def test_an_entry_point_that_implements_no_hook_is_said(tmp_path, monkeypatch, caplog, value,
                                                        suggestion):
    # before: listed as a working plugin without a word, its writer unknown to --report
    package = tmp_path / "idle_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "writer.py").write_text(textwrap.dedent(WRITER_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(plugins, "_warned_values", set(), raising=False)
    ep = importlib.metadata.EntryPoint(name="idle", value=value, group="wbc_batch")
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: iter([FakeDist("idle-dist", "0.1", [ep])]))
    with caplog.at_level("WARNING", logger="wbc_batch"):
        assert get_plugin_manager().get_plugin("idle") is not None
    assert f"plugin 'idle' ({value}, from idle-dist) implements no wbc-batch hook" in caplog.text
    assert suggestion in caplog.text
    for module in ("idle_pkg", "idle_pkg.writer"):
        sys.modules.pop(module, None)


def test_a_plugin_with_hooks_loaded_through_its_entry_point_is_not_said_idle(acme_installed,
                                                                              caplog):
    with caplog.at_level("WARNING", logger="wbc_batch"):
        get_plugin_manager()
    assert "implements no wbc-batch hook" not in caplog.text


# --- every hook: documented and exercised ----------------------------------------------------------

@pytest.mark.parametrize("name", hook_names())
def test_hook_is_documented(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert doc.split("\n")[0].strip(), f"{name}: no summary line"
    for arg in inspect.signature(spec).parameters:
        assert f":param {arg}:" in doc, f"{name}: argument {arg} undocumented"
    if name.startswith("wbc_register_") and name != "wbc_register_commands":
        assert ":returns:" in doc, f"{name}: return value undocumented"
    if spec.wbc_batch_spec.get("firstresult"):
        assert "first non-None result" in doc
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"`{name}" in readme, f"{name} is not in the README's hook list"


class EveryHook:
    """Implements every hook and records which were called (and with what)."""

    def __init__(self):
        self.called = {}

    def _seen(self, name, **kwargs):
        self.called[name] = kwargs

    @hookimpl
    def wbc_register_backends(self):
        self._seen("wbc_register_backends")

    @hookimpl
    def wbc_register_report_writers(self):
        self._seen("wbc_register_report_writers")

    @hookimpl
    def wbc_register_truth_readers(self):
        self._seen("wbc_register_truth_readers")

    @hookimpl
    def wbc_register_commands(self, cli):
        self._seen("wbc_register_commands", cli=cli)

    @hookimpl
    def wbc_run_start(self, config, total):
        self._seen("wbc_run_start", config=config, total=total)

    @hookimpl
    def wbc_image_start(self, image, index, total):
        self._seen("wbc_image_start", image=image, index=index, total=total)

    @hookimpl
    def wbc_image_done(self, result, index, total):
        self._seen("wbc_image_done", result=result, index=index, total=total)

    @hookimpl
    def wbc_run_end(self, config, results, seconds):
        self._seen("wbc_run_end", config=config, results=results, seconds=seconds)


def test_every_hook_is_exercised(pm, make_config, image_folder, tmp_path):
    implemented = sorted(n for n in vars(EveryHook) if n.startswith("wbc_"))
    assert implemented == hook_names(), "a new hook needs an implementation here (and a test)"
    rec = EveryHook()
    pm.register(rec, name="every-hook")
    build_cli(pm)
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\ns1/a.png,neutrophil\n", encoding="utf-8")
    from wbc_batch.pipeline import run

    run(make_config(image_folder, tmp_path / "out", truth=truth, truth_format="csv"), pm)
    assert sorted(rec.called) == hook_names()
    assert rec.called["wbc_run_start"]["total"] == 4
    assert rec.called["wbc_image_done"]["index"] == 3
    assert len(rec.called["wbc_run_end"]["results"]) == 4


def test_core_and_plugins_do_not_import_torch_or_onnxruntime():
    """The command line starts without loading torch or onnxruntime (backends load them when
    opened or asked about their availability)."""
    import subprocess

    code = ("import sys; from wbc_batch.cli import build_cli; import wbc_batch.pipeline; "
            "build_cli(); print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, DISABLE_AUTOLOAD_ENV: "1"})
    assert out.stdout.strip() == "[]"


def test_a_plugin_failing_in_a_lifecycle_hook_is_named_and_the_run_goes_on(
        pm, make_config, image_folder, tmp_path, caplog):
    # before: a progress or logging plugin raising in wbc_image_done lost the whole batch
    from wbc_batch.hookspecs import hookimpl
    from wbc_batch.pipeline import run

    class Flaky:
        calls = 0

        @hookimpl
        def wbc_image_done(self, result, index, total):
            Flaky.calls += 1
            raise RuntimeError("progress bar bug")

    class Counter:
        done = []

        @hookimpl
        def wbc_image_done(self, result, index, total):
            Counter.done.append(index)

    pm.register(Counter(), name="counter")
    pm.register(Flaky(), name="flaky")  # called first: pluggy calls the last registered first
    pm.register(Flaky(), name="flaky2")  # the same class again: blamed for its own failure only
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    assert outcome.exit_code == 0 and len(outcome.results) == 4
    assert (tmp_path / "out" / "images.csv").is_file()
    assert "plugin 'flaky' failed in wbc_image_done: RuntimeError: progress bar bug" in caplog.text
    assert "plugin 'flaky2' failed" in caplog.text
    assert Flaky.calls == 2  # each left out after its own failure
    assert Counter.done == [0, 1, 2, 3]  # the other plugin got every call


def test_the_readmes_example_writer_works_as_written(pm, make_config, tmp_path):
    import json
    import types

    from conftest import standard_field, write_image
    from wbc_batch.pipeline import run

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index("A complete plugin that writes a JSON file"):]
    code = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    module = types.ModuleType("wbc_counts_json")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    pm.register(module, name="counts-json")
    write_image(tmp_path / "in" / "=x.png", standard_field())
    out = tmp_path / "out"
    outcome = run(make_config(tmp_path / "in", out, writers=("csv", "counts-json")), pm)
    assert outcome.exit_code == 0
    rows = json.loads((out / "counts.json").read_text())
    assert [r["image"] for r in rows] == ["=x.png"]  # the file's own name, for a JSON reader
    assert rows[0]["wbc_count"] == len(outcome.results[0].cells)


def test_the_readmes_plugin_pyproject_is_complete():
    # it once held only the entry-point table, which pip refuses ("must contain version")
    tomllib = pytest.importorskip("tomllib")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index("A complete plugin that writes a JSON file"):]
    conf = tomllib.loads(re.search(r"```toml\n(.*?)```", after, re.S).group(1))
    assert conf["build-system"]["build-backend"] == "setuptools.build_meta"
    assert {"name", "version"} <= set(conf["project"])
    assert conf["tool"]["setuptools"]["py-modules"] == ["wbc_counts_json"]
    assert conf["project"]["entry-points"]["wbc_batch"] == {"counts-json": "wbc_counts_json"}


def test_a_third_party_plugin_named_like_a_built_in_is_refused_not_skipped(tmp_path, monkeypatch):
    # pluggy skipped an entry point named 'csv' without a word: its writers just vanished
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    ep = importlib.metadata.EntryPoint(name="csv", value="acme_csv", group="wbc_batch")
    own = [importlib.metadata.EntryPoint(name=n, value=m, group="wbc_batch") for n, m in BUILTINS]
    dists = [FakeDist("wbc-batch", "0.1.0", own), FakeDist("acme-csv", "1.0", [ep])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    with pytest.raises(PluginError, match="two 'wbc_batch' plugins are named 'csv': wbc-batch "
                                          r"\(built in\) and acme-csv"):
        get_plugin_manager()
    # one distribution found twice under two spellings of its name is one plugin
    from wbc_batch.plugins import name_clashes

    acme = importlib.metadata.EntryPoint(name="acme", value="acme_csv", group="wbc_batch")
    dists = [FakeDist("wbc-batch", "0.1.0", own), FakeDist("acme-csv", "1.0", [acme]),
             FakeDist("Acme_CSV", "1.0", [acme])]
    assert name_clashes() == []


def test_a_plugin_command_may_not_replace_one_wbc_batch_has(pm):
    import click

    class Takeover:
        @hookimpl
        def wbc_register_commands(self, cli):
            cli.add_command(click.Command("run", callback=lambda: None))

    pm.register(Takeover(), name="takeover")
    with pytest.raises(PluginError, match="plugin 'takeover' replaces or removes the command "
                                          "'run', which wbc-batch already has"):
        build_cli(pm)


def test_a_plugin_calling_sys_exit_in_wbc_register_commands_is_named(pm):
    class Quitter:
        @hookimpl
        def wbc_register_commands(self, cli):
            sys.exit(1)

    pm.register(Quitter(), name="quitter")
    with pytest.raises(PluginError, match="plugin 'quitter' failed in wbc_register_commands: "
                                          "SystemExit: 1"):
        build_cli(pm)


def test_backend_availability_is_read_one_way_for_run_and_plugins():
    # `run` and `plugins` each unpacked availability() their own way
    from wbc_batch.plugins import backend_availability

    class Answers:
        def __init__(self, answer):
            self.answer = answer

        def availability(self):
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    assert backend_availability(Answers((True, " CPU only "))) == (True, "CPU only")
    assert backend_availability(Answers((0, "licence server unreachable"))) == \
        (False, "licence server unreachable")
    # before: "ValueError: too many values to unpack", which did not say what was wrong
    assert backend_availability(Answers("yes")) == \
        (None, "availability check failed: it answered 'yes', not a (usable, detail) pair")
    assert backend_availability(Answers(SystemExit(9))) == \
        (None, "availability check failed: SystemExit: 9")
    with pytest.raises(KeyboardInterrupt):
        backend_availability(Answers(KeyboardInterrupt()))


def test_broken_third_party_backends_and_truth_readers_are_named(pm, make_config, tmp_path, caplog):
    # before: tracebacks, or every image failing with "'NoneType' object has no attribute"
    from wbc_batch.pipeline import PipelineError, Runner
    from wbc_batch.truth import TruthError, load_truth

    class Broken:
        name = "broken"

        def availability(self):
            return True, ""

        def open(self, bundle, device="auto", threads=0):
            raise KeyError("weights")

    class Empty(Broken):
        name = "empty"

        def open(self, bundle, device="auto", threads=0):
            return None

    class Off(Broken):  # `wbc-batch plugins` listed it NOT usable; `run` used it without a word
        name = "off"

        def availability(self):
            return False, "licence server unreachable"

    class Odd(Broken):  # an availability check that fails leaves the word to open()
        name = "odd"

        def availability(self):
            return "yes"

    class Plugin:
        @hookimpl
        def wbc_register_backends(self):
            return [Broken(), Empty(), Off(), Odd()]

    pm.register(Plugin())
    with pytest.raises(PipelineError, match="backend 'broken' failed to open: KeyError"):
        Runner(make_config(tmp_path, tmp_path / "out", backend="broken"), pm)
    with pytest.raises(PipelineError, match="backend 'empty' opened None, which has no segment"):
        Runner(make_config(tmp_path, tmp_path / "out", backend="empty"), pm)
    with pytest.raises(PipelineError, match="backend 'off' is not usable here: licence server "
                                            "unreachable"):
        Runner(make_config(tmp_path, tmp_path / "out", backend="off"), pm)
    with pytest.raises(PipelineError, match="backend 'odd' failed to open: KeyError"):
        Runner(make_config(tmp_path, tmp_path / "out", backend="odd"), pm)

    class Reader:
        name, priority = "shaky", 100

        def can_read(self, path):
            raise OSError("share gone")

        def read(self, path, input_dir):
            raise KeyError("image")

    (tmp_path / "t.csv").write_text("image,class\na.png,neutrophil\n")
    readers = {"shaky": Reader(), **get_truth_readers(pm)}
    assert load_truth(tmp_path / "t.csv", readers).reader == "csv"  # the others still read it
    assert "truth reader 'shaky' failed while looking at" in caplog.text
    with pytest.raises(TruthError, match="truth reader 'shaky' failed on .*KeyError"):
        load_truth(tmp_path / "t.csv", readers, fmt="shaky")


class PassThrough:
    """A wrapper implementation of `wbc_image_done` that only passes the call on: with one, the
    lifecycle hook is called through pluggy as a whole (`plugins.Lifecycle`)."""

    @hookimpl(wrapper=True)
    def wbc_image_done(self, result, index, total):
        return (yield)


def test_with_a_wrapper_on_the_hook_the_failing_plugin_is_still_named_and_left_out(caplog):
    from wbc_batch.plugins import Lifecycle

    pm = get_plugin_manager(autoload=False)
    calls = []

    class Good:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            calls.append(index)

    import functools

    def timed(func):  # a decorator a plugin might put on its hook
        @functools.wraps(func)
        def inner(*args, **kwargs):
            return func(*args, **kwargs)
        return inner

    class Bad:
        @hookimpl
        @timed
        def wbc_image_done(this, result, index, total):
            raise RuntimeError("boom")

    pm.register(Good(), name="good")
    pm.register(Bad(), name="bad")
    pm.register(PassThrough(), name="wrap")
    hooks = Lifecycle(pm)
    for i in range(3):
        hooks("wbc_image_done", result=None, index=i, total=3)
    assert "plugin 'bad' failed in wbc_image_done" in caplog.text  # not the wrapper it passed
    assert calls == [1, 2]  # missed only the call the bad plugin failed in


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("stop, said", [
    # before: SystemExit went past `except Exception`: no reports, wbc-batch exited with its code
    (SystemExit(3), "SystemExit: 3"),
    # before: an async uploader's CancelledError (a BaseException) lost the batch: a traceback,
    # exit code 1 and no report at all
    (asyncio.CancelledError("upload cancelled"), "CancelledError: upload cancelled"),
])
def test_a_plugin_calling_sys_exit_in_a_lifecycle_hook_does_not_lose_the_batch(
        pm, make_config, image_folder, tmp_path, caplog, wrapped, stop, said):
    from wbc_batch.pipeline import run

    class Quitter:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            if index == 1:
                raise stop

    pm.register(Quitter(), name="quitter")
    if wrapped:
        pm.register(PassThrough(), name="wrap")
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    assert outcome.exit_code == 0 and len(outcome.results) == 4
    assert len((tmp_path / "out" / "images.csv").read_text(encoding="utf-8").splitlines()) == 5
    assert f"plugin 'quitter' failed in wbc_image_done: {said}" in caplog.text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups came in Python 3.11")
def test_an_exception_group_holding_a_ctrl_c_stops_and_one_without_is_a_failure():
    from wbc_batch.plugins import reraise_stops

    cancelled = asyncio.CancelledError("upload cancelled")
    reraise_stops(BaseExceptionGroup("tasks", [cancelled, ValueError("x")]))  # noqa: F821
    # a task group stopped by Ctrl-C stops the run as Ctrl-C does: the stop itself is raised
    # (before: the group, which no `except KeyboardInterrupt` takes: no reports, a traceback)
    inner = BaseExceptionGroup("inner", [ValueError("x"), KeyboardInterrupt("ctrl-c")])  # noqa: F821
    with pytest.raises(KeyboardInterrupt, match="ctrl-c"):
        reraise_stops(BaseExceptionGroup("tasks", [cancelled, inner]))  # noqa: F821
    for stop in (KeyboardInterrupt(), GeneratorExit()):
        with pytest.raises(type(stop)):
            reraise_stops(stop)
    # Ctrl-C before a generator's close, and a second signal's StopNow before a first one's
    from wbc_batch.interrupts import StopNow

    with pytest.raises(KeyboardInterrupt):
        reraise_stops(BaseExceptionGroup("g", [GeneratorExit(), KeyboardInterrupt()]))  # noqa: F821
    with pytest.raises(StopNow):
        reraise_stops(BaseExceptionGroup("g", [KeyboardInterrupt(), StopNow(15)]))  # noqa: F821


def test_a_registration_hook_returning_no_list_is_said_once_with_run_s_manager(pm):
    # a first version said it twice over, as if the plugin had raised a PluginError
    class Odd:
        @hookimpl
        def wbc_register_report_writers(self):
            return "notalist"

    manager = get_plugin_manager(autoload=False)
    manager.register(Odd(), name="odd")
    with pytest.raises(PluginError) as info:
        get_report_writers(manager)
    assert str(info.value).startswith("plugin 'odd''s wbc_register_report_writers returned a "
                                      "builtins.str, not a list of report writers; set ")
    assert str(info.value).count("WBC_BATCH_DISABLE_PLUGINS") == 1


@pytest.mark.parametrize("retry_after", [None, 600.0])
def test_a_plugin_failing_in_wbc_run_end_is_not_said_to_go_on(caplog, retry_after):
    # before: "the run goes on without its lifecycle hooks for 10 minutes, then tries it again",
    # printed after a watch session had ended
    from wbc_batch.plugins import Lifecycle

    pm = get_plugin_manager(autoload=False)

    class Ender:
        @hookimpl
        def wbc_run_end(self, config, results, seconds):
            raise OSError("share gone")

    pm.register(Ender(), name="ender")
    Lifecycle(pm, retry_after=retry_after)("wbc_run_end", config=None, results=[], seconds=1.0)
    assert ("plugin 'ender' failed in wbc_run_end: OSError: share gone; the reports stand as "
            "written") in caplog.text
    assert "goes on" not in caplog.text and "tries it again" not in caplog.text


def test_keyboard_interrupt_in_a_lifecycle_hook_still_stops_the_run():
    from wbc_batch.plugins import Lifecycle

    pm = get_plugin_manager(autoload=False)

    class CtrlC:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            raise KeyboardInterrupt

    pm.register(CtrlC(), name="ctrl-c")
    with pytest.raises(KeyboardInterrupt):
        Lifecycle(pm)("wbc_image_done", result=None, index=0, total=1)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_watcher_calls_a_plugin_that_failed_again_after_a_while(monkeypatch, caplog, wrapped):
    # before: one failure (a network share away for a moment) left the plugin out of a watch
    # session's hooks for good, however many days it ran
    from wbc_batch import plugins as plugins_module
    from wbc_batch.plugins import Lifecycle

    now = [1000.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: now[0])
    pm = get_plugin_manager(autoload=False)
    calls, down = [], [True]

    class Upload:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            calls.append(index)
            if down[0]:
                raise OSError("share not mounted")

    pm.register(Upload(), name="upload")
    if wrapped:
        pm.register(PassThrough(), name="wrap")
    hooks = Lifecycle(pm, retry_after=600)

    def image(i):
        hooks("wbc_image_start", image=f"{i}.png", index=i, total=9)
        hooks("wbc_image_done", result=None, index=i, total=9)

    with caplog.at_level("WARNING", logger="wbc_batch"):
        image(0)
        now[0] += 599
        image(1)  # still left out
        now[0] += 1
        image(2)  # tried again, from the image's start: fails again
        image(3)
        down[0] = False
        now[0] += 600
        hooks("wbc_image_done", result=None, index=4, total=9)  # not taken back mid-image
        image(5)
        image(6)
    assert calls == [0, 2, 5, 6]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all(s.endswith("the run goes on without its lifecycle hooks for 10 "
                                             "minutes, then tries it again") for s in said)
    # `run` leaves it out for the rest of the run, as before
    once = Lifecycle(pm)
    down[0] = True
    once("wbc_image_done", result=None, index=7, total=9)
    now[0] += 10 ** 6
    once("wbc_image_start", image="8.png", index=8, total=9)
    once("wbc_image_done", result=None, index=8, total=9)
    assert calls[-1] == 7


def test_a_plugin_taken_back_gets_the_end_only_of_images_whose_start_it_saw(monkeypatch, caplog):
    # a watcher starts image N before image N-1 is done (its overlay is written meanwhile): taken
    # back at N's start, a plugin keeping state from start to done got N-1's done, failed on it,
    # and was left out again, every time
    from wbc_batch import plugins as plugins_module
    from wbc_batch.plugins import Lifecycle

    now = [0.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: now[0])

    class Strict:
        def __init__(self):
            self.started, self.done, self.fail_at = {}, [], 1

        @hookimpl
        def wbc_image_start(self, image, index, total):
            self.started[index] = image

        @hookimpl
        def wbc_image_done(self, result, index, total):
            self.started.pop(index)  # KeyError for an image it never saw start
            if index == self.fail_at:
                self.fail_at = None
                raise OSError("LIS down once")
            self.done.append(index)

    for wrapped in (False, True):
        pm = get_plugin_manager(autoload=False)
        pm.unregister(name="progress")
        strict = Strict()
        pm.register(strict, name="strict")
        if wrapped:
            pm.register(PassThrough(), name="wrap")
        hooks = Lifecycle(pm, retry_after=600)
        caplog.clear()
        with caplog.at_level("WARNING", logger="wbc_batch"):
            hooks("wbc_image_start", image="0.png", index=0, total=6)
            for i in range(1, 6):  # as a watcher calls them: start(i), then done(i - 1)
                now[0] += 400
                hooks("wbc_image_start", image=f"{i}.png", index=i, total=6)
                hooks("wbc_image_done", result=None, index=i - 1, total=6)
            hooks("wbc_image_done", result=None, index=5, total=6)
        said = [m for m in caplog.messages if "'strict'" in m]
        assert len(said) == 1 and "LIS down once" in said[0], said
        # failed at 1's done (t = 800 s), taken back at 4's start (t = 1600 s): not given 3's done
        assert strict.done == [0, 4, 5]


def test_a_plugin_taken_back_gets_the_end_of_a_retried_image_under_its_old_index(monkeypatch,
                                                                                 caplog):
    # a watcher retries a file (half written at first) under its old index, out of order: taken
    # back later, the plugin saw the retry start but was not given its end, and was given the
    # end of an image in flight whose start it had not seen
    from wbc_batch import plugins as plugins_module
    from wbc_batch.plugins import Lifecycle

    now = [0.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: now[0])
    started, done, down = {}, [], [True]

    class Strict:
        @hookimpl
        def wbc_image_start(self, image, index, total):
            if down.pop() if down else False:
                raise OSError("LIS down once")
            started[index] = image

        @hookimpl
        def wbc_image_done(self, result, index, total):
            started.pop(index)
            done.append(index)

    pm = get_plugin_manager(autoload=False)
    pm.unregister(name="progress")
    pm.register(Strict(), name="strict")
    hooks = Lifecycle(pm, retry_after=600)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        hooks("wbc_image_start", image="a.png", index=0, total=4)  # fails: left out
        hooks("wbc_image_start", image="b.png", index=1, total=4)
        hooks("wbc_image_done", result=None, index=1, total=4)
        hooks("wbc_image_start", image="c.png", index=2, total=4)
        now[0] += 700
        hooks("wbc_image_start", image="a.png", index=0, total=4)  # a's retry: taken back
        hooks("wbc_image_done", result=None, index=2, total=4)  # c: not seen to start
        hooks("wbc_image_done", result=None, index=0, total=4)  # a: seen
        hooks("wbc_image_start", image="d.png", index=3, total=4)
        hooks("wbc_image_done", result=None, index=3, total=4)
    assert done == [0, 3] and started == {}
    assert [m for m in caplog.messages if "'strict'" in m] == [
        "plugin 'strict' failed in wbc_image_start: OSError: LIS down once; the run goes on "
        "without its lifecycle hooks for 10 minutes, then tries it again"]


def test_a_plugin_left_out_while_idle_is_taken_back_for_the_runs_end(monkeypatch):
    from wbc_batch import plugins as plugins_module
    from wbc_batch.plugins import Lifecycle

    now = [0.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: now[0])
    ends = []

    class Flaky:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            raise OSError("share not mounted")

        @hookimpl
        def wbc_run_end(self, config, results, seconds):
            ends.append(seconds)

    pm = get_plugin_manager(autoload=False)
    pm.unregister(name="progress")
    pm.register(Flaky(), name="flaky")
    hooks = Lifecycle(pm, retry_after=600)
    hooks("wbc_image_start", image="a.png", index=0, total=1)
    hooks("wbc_image_done", result=None, index=0, total=1)  # fails: left out
    hooks("wbc_run_end", config=None, results=[], seconds=1.0)  # too soon: still out
    now[0] += 700
    hooks("wbc_run_end", config=None, results=[], seconds=2.0)
    assert ends == [2.0]


def test_a_watcher_never_takes_back_a_plugin_whose_run_start_failed(monkeypatch, caplog):
    # its setup for the session (a link to the LIS) was never made: taken back, it failed at
    # every image, ten minutes apart, and never recovered
    from wbc_batch import plugins as plugins_module
    from wbc_batch.plugins import Lifecycle

    now = [0.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: now[0])

    class LisUpload:
        sent = None

        @hookimpl
        def wbc_run_start(self, config, total):
            raise OSError("LIS share not mounted")

        @hookimpl
        def wbc_image_done(self, result, index, total):
            self.sent.append(index)

    pm = get_plugin_manager(autoload=False)
    pm.unregister(name="progress")  # it needs a real config
    pm.register(LisUpload(), name="lis")
    hooks = Lifecycle(pm, retry_after=600)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        hooks("wbc_run_start", config=None, total=3)
        for i in range(3):
            now[0] += 700
            hooks("wbc_image_start", image=f"{i}.png", index=i, total=3)
            hooks("wbc_image_done", result=None, index=i, total=3)
    said = [m for m in caplog.messages if "'lis'" in m]
    assert said == ["plugin 'lis' failed in wbc_run_start: OSError: LIS share not mounted; the "
                    "run goes on without its lifecycle hooks until it is started again"]


def test_run_says_when_a_backends_availability_check_failed(caplog):
    # before: `plugins` listed it as "NOT usable", and `run` used it without a word
    from wbc_batch.pipeline import _not_usable

    class Shaky:
        name = "shaky"

        def availability(self):
            raise RuntimeError("licence server unreachable")

    with caplog.at_level("WARNING", logger="wbc_batch"):
        assert _not_usable(Shaky()) == ""  # opening it says what is wrong, if anything
    assert caplog.messages == ["backend 'shaky': availability check failed: RuntimeError: licence "
                               "server unreachable; opening it all the same"]


def test_command_plugins_use_only_the_cli_helpers_the_readme_names():
    # third-party commands had to copy what the built-in ones imported from wbc_batch.cli, with
    # no word on which of it would keep working
    import ast

    from wbc_batch import cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Commands from plugins"):readme.index("## Using it from")]
    for name in cli.COMMAND_HELPERS:
        assert hasattr(cli, name), name
        assert f"`{name}" in section, f"{name} is not in the README's list"
    for path in sorted((ROOT / "plugins").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "wbc_batch.cli":
                used = {a.name for a in node.names} - set(cli.COMMAND_HELPERS)
                assert not used, f"{path.name} imports {used} from wbc_batch.cli"


def test_tracebacks_are_printed_only_for_failures_and_where_asked(monkeypatch, capsys, caplog):
    def failed():
        try:
            raise KeyError("read boom")
        except KeyError as exc:
            return exc

    exc = failed()
    monkeypatch.setattr(plugins, "_warned_values", set(), raising=False)
    monkeypatch.delenv(plugins.TRACEBACKS_ENV, raising=False)
    plugins.reraise_stops(exc)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(plugins.TRACEBACKS_ENV, " Yes ")
    plugins.reraise_stops(exc)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and ", in failed\n" in err
    assert err.endswith("KeyError: 'read boom'\n")
    with pytest.raises(KeyboardInterrupt):  # a stop is no failure: raised, not printed
        plugins.reraise_stops(KeyboardInterrupt())
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(plugins.TRACEBACKS_ENV, "verbose")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        plugins.reraise_stops(exc)
        plugins.reraise_stops(exc)
    assert capsys.readouterr().err == ""
    assert caplog.messages == ["WBC_BATCH_TRACEBACKS='verbose' is none of 1, true, yes, on, y "
                               "(tracebacks on) or 0, false, no, off, n, empty (off); taken as off"]


def test_the_listing_names_the_plugin_behind_a_third_partys_writer_and_reader():
    from conftest import register_writers

    class Upload:
        name = "lis-upload"

        def write(self, out_dir, tables):
            return []

    pm = get_plugin_manager(autoload=False)
    register_writers(pm, Upload(), name="lab-reports")
    assert plugins.third_party_owners(pm, "wbc_register_report_writers") == {"lis-upload": "lab-reports"}
    assert plugins.third_party_owners(pm, "wbc_register_truth_readers") == {}
    res = CliRunner().invoke(build_cli(pm), ["plugins"])
    assert res.exit_code == 0
    assert "Report writers: csv, lis-upload (plugin lab-reports), xlsx\n" in res.output
    assert "Truth readers: csv, voc, wbc_dataset, yolo\n" in res.output
