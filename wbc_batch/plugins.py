"""The plugin manager: built-in plugins, entry-point plugins, and the registries they fill.

`get_plugin_manager()` builds a fresh manager on every call (there is no import-time global, so
tests and the watcher can always start clean):

1. the hook specifications of `wbc_batch.hookspecs`;
2. the built-in plugins of `BUILTINS`, each registered under the same name as its entry point in
   setup.cfg, so the entry-point pass below skips them instead of loading them twice;
3. every other plugin of the `wbc_batch` entry-point group, unless the environment variable
   `WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD` is 1, true, yes, on or y (any case; `autoload_disabled`
   has the other values), one entry point at a time, so that one that cannot be loaded is named
   with its distribution and does not stop the others (`load_entry_points`);
   except those WBC_BATCH_DISABLE_PLUGINS names (`_block_disabled`);
4. `check_pending()` after each, so a hook implementation with a misspelled name fails loudly;
   a function named like a hook but not marked `@hookimpl` is named in a warning.

A plugin that cannot be loaded is an error (PluginError) for every caller, except where the caller
asks to keep it in `broken_plugins(pm)` instead (`get_plugin_manager(keep_broken=True)`): the
command line does, so that `wbc-batch --help` and `wbc-batch plugins` still show what is installed
and what is wrong, while every other command refuses to start. So is every other fault a plugin
brings: two distributions with one entry-point name, a registration hook that raises or offers a
name another plugin (or the same) already offers, or a nameless object, and a
`wbc_register_commands` that raises or replaces a command; with `keep_broken` the offending
plugin's entries or commands are left out and the fault is listed with the others. A lab's report
writer or truth reader silently missing would change what a run writes; an error naming the plugin
and its distribution does not.

The registration hooks are collected into name -> object dicts (`get_backends`,
`get_report_writers`, `get_truth_readers`); after that the core looks things up by name and never
knows which plugin offered them. Two plugins offering the same name is an error naming both.
"""

from __future__ import annotations

import builtins
import importlib
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping

import pluggy

from . import hookspecs
from .errors import WbcBatchError

PROJECT = "wbc_batch"
ENTRY_POINT_GROUP = "wbc_batch"
DISABLE_AUTOLOAD_ENV = "WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD"
#: third-party plugins (entry-point names, separated by commas or spaces) not to load
DISABLE_PLUGINS_ENV = "WBC_BATCH_DISABLE_PLUGINS"

#: (plugin name = entry-point name in setup.cfg, module). Keep both lists identical; a test checks.
BUILTINS = (
    ("torch", "wbc_batch_plugins.torch_backend"),
    ("onnx", "wbc_batch_plugins.onnx_backend"),
    ("csv", "wbc_batch_plugins.csv_writer"),
    ("xlsx", "wbc_batch_plugins.xlsx_writer"),
    ("progress", "wbc_batch_plugins.progress"),
    ("train", "wbc_batch_plugins.train_command"),
    ("truth_csv", "wbc_batch_plugins.truth_csv"),
    ("truth_voc", "wbc_batch_plugins.truth_voc"),
    ("truth_wbc_dataset", "wbc_batch_plugins.truth_wbc_dataset"),
    ("truth_yolo", "wbc_batch_plugins.truth_yolo"),
    ("evaluate", "wbc_batch_plugins.evaluate_command"),
    ("watch", "wbc_batch_plugins.watch_command"),
)


log = logging.getLogger("wbc_batch")


class PluginError(WbcBatchError, RuntimeError):
    """A plugin could not be loaded or brings a fault (module docstring)."""


#: the end of every message about a third party's fault
AUTOLOAD_HINT = f"set {DISABLE_AUTOLOAD_ENV}=1 to start without third-party plugins"


def skip_hint(pm, name: str) -> str:
    """The end of a message about plugin `name`'s fault: how to start without that plugin alone
    (`DISABLE_PLUGINS_ENV`), where it is a third party's, and without them all."""
    if name in dict(BUILTINS) or (pm is not None and pm.get_plugin(name) is None
                                  and not pm.is_blocked(name)):
        return AUTOLOAD_HINT
    return (f"set {DISABLE_PLUGINS_ENV}={name} to start without it, or "
            f"{DISABLE_AUTOLOAD_ENV}=1 without any third-party plugin")


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus

    - `broken`: [(plugin name, one-line reason)] of the plugins that could not be loaded or bring
      a fault (module docstring); filled only where `keep_broken` is set;
    - `keep_broken`: record those faults in `broken` instead of raising PluginError;
    - `autoload_off`: third-party plugins were not loaded because
      WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD says so (`autoload_note`).
    """

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self.broken: list = []
        self.keep_broken = False
        self.autoload_off = False
        #: third-party plugins not loaded because WBC_BATCH_DISABLE_PLUGINS names them
        self.switched_off: list = []
        #: hook name -> the registry `collect` built from it; emptied whenever a plugin comes
        #: or goes, so that each registration hook runs once per set of plugins and the
        #: objects checked at start-up are the ones used
        self.registries: dict = {}

    def register(self, plugin, name=None):
        self.registries.clear()
        return super().register(plugin, name=name)

    def unregister(self, plugin=None, name=None):
        self.registries.clear()
        return super().unregister(plugin=plugin, name=name)

    def parse_hookimpl_opts(self, plugin, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("wbc_"):
            _warn_unmarked(self, plugin, name)
        return opts


#: what a third party's code may raise and still be "a failing plugin": every exception but a
#: stop (`reraise_stops`), so that neither sys.exit() nor an asyncio.CancelledError (or another
#: BaseException of an async or green-thread library) escaping a plugin can end wbc-batch and
#: lose its batch. Caught at every call into plugin code: entry-point imports, registration and
#: lifecycle hooks, report writers, backends (availability, open, the session's calls), truth
#: readers, as `except PLUGIN_FAILURES as exc: reraise_stops(exc)`.
PLUGIN_FAILURES = BaseException
#: what stops wbc-batch: Ctrl-C and the signals `interrupts` turns into KeyboardInterrupt (its
#: StopNow too), and a generator being closed
STOPS = (KeyboardInterrupt, GeneratorExit)


def reraise_stops(exc: BaseException) -> None:
    """Raise `exc` again where it is a stop (`STOPS`), not a plugin's failure: Ctrl-C stops a
    run, whoever's code is running. From an exception group holding one (an async library's task
    group stopped by Ctrl-C), the first stop in it is raised, from the group, so that the run
    stops as it does for Ctrl-C, its reports written. A failure is said in one line by the
    caller; where WBC_BATCH_TRACEBACKS asks for it (`show_tracebacks`), its traceback is
    printed to stderr here first, for the plugin's author."""
    if isinstance(exc, STOPS):
        raise exc
    group = getattr(builtins, "BaseExceptionGroup", None)  # Python 3.11+
    if group is not None and isinstance(exc, group):
        from .interrupts import StopNow

        for kind in STOPS:  # Ctrl-C before a generator's close; a second signal's StopNow first
            found = _leaves(exc.subgroup(kind), group)
            if found:
                raise next((e for e in found if isinstance(e, StopNow)), found[0]) from exc
    if show_tracebacks() and not _shown_before(exc):
        import sys
        import traceback

        sys.stderr.write(f"wbc-batch: a failure's traceback ({TRACEBACKS_ENV} is set):\n"
                         + "".join(traceback.format_exception(exc)))
        sys.stderr.flush()


def _shown_before(exc: BaseException) -> bool:
    """Whether the traceback of `exc`, or of an exception it was raised from (a backend's error
    wrapped as BackendError and caught again), was printed already; marks `exc` as printed."""
    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        if getattr(link, "_wbc_traceback_shown", False):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    try:
        exc._wbc_traceback_shown = True
    except AttributeError:  # an exception class that takes no attributes: printed each time
        pass
    return False


#: set to 1 (true, yes, on, y) to have every failure caught in a plugin's code, or in one image's
#: analysis, printed with its traceback before its one-line message
TRACEBACKS_ENV = "WBC_BATCH_TRACEBACKS"


def show_tracebacks() -> bool:
    """Whether WBC_BATCH_TRACEBACKS is 1, true, yes, on or y (any case); other values, said
    once in a warning, leave tracebacks off, as unset does."""
    raw = os.environ.get(TRACEBACKS_ENV, "")
    value = raw.strip().lower()
    if value in _DISABLE_WORDS or value in _ENABLE_WORDS:
        return value in _DISABLE_WORDS
    _warn_once(f"{TRACEBACKS_ENV}={raw!r} is none of {', '.join(_DISABLE_WORDS)} (tracebacks "
               f"on) or {', '.join(w or 'empty' for w in _ENABLE_WORDS)} (off); taken as off")
    return False


def _leaves(exc, group) -> list:
    """The exceptions inside the exception group `exc`, nested groups opened; [] for None."""
    if exc is None:
        return []
    if not isinstance(exc, group):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner, group)]


class Lifecycle:
    """Calls the lifecycle hooks (`wbc_run_start`, `wbc_image_start`, `wbc_image_done`,
    `wbc_run_end`) so that a plugin failing in one never loses a batch: each implementation is
    called on its own, in pluggy's order, and one that raises is named in a warning and left out
    of the lifecycle hooks for the rest of the run, while the others still get every call. With
    `retry_after` (seconds; a watcher, whose run lasts days) it is called again once that time
    has passed, from the next image's start (and `wbc_image_done` only for the images whose
    start it saw: a watcher starts an image before the one before it is done) or the run's end:
    a failure that went away (a network share back) does not silence it for good, and one that
    stays is said at most once per `retry_after`. One that failed in `wbc_run_start` stays out:
    its setup for the run was never done.
    A plugin calling sys.exit() (SystemExit) fails like any other: it cannot end the batch
    before its reports are written. KeyboardInterrupt goes through (Ctrl-C stops a run, whoever
    is running). A hook with a
    wrapper implementation is called through pluggy as a whole (a wrapper must see the call):
    then the failing plugin, found in the traceback, is left out from the next call on, and
    the others miss only the call it failed in."""

    def __init__(self, pm, retry_after: float | None = None):
        self.pm = pm
        self.retry_after = retry_after
        self.left_out: list = []
        self._since: dict = {}  # id(plugin) -> when it was left out; None: for good
        #: id(plugin) -> the indices of the images in flight whose start it saw, since it was
        #: taken back (a watcher retries a file under its old index, out of order)
        self._seen: dict = {}

    def _out(self, plugin) -> bool:
        return any(p is plugin for p in self.left_out)

    def _leave_out(self, plugin, hook: str) -> None:
        if not self._out(plugin):
            self.left_out.append(plugin)
            self._since[id(plugin)] = None if _for_good(hook) else time.monotonic()
            self._seen.pop(id(plugin), None)

    def _readmit(self, hook: str, kwargs: dict) -> None:
        """Take back, at an image's start or the run's end, the plugins left out `retry_after`
        seconds ago or longer; not one that failed in `wbc_run_start`, whose setup for the run
        was never done."""
        if (self.retry_after is None or not self.left_out
                or hook not in ("wbc_image_start", "wbc_run_end")):
            return
        now = time.monotonic()
        for plugin in [p for p in self.left_out if self._since[id(p)] is not None
                       and now - self._since[id(p)] >= self.retry_after]:
            self.left_out = [p for p in self.left_out if p is not plugin]
            del self._since[id(plugin)]
            self._seen[id(plugin)] = set()

    def _skipped(self, name: str, kwargs: dict) -> list:
        """The plugins this call leaves out: those left out, and for `wbc_image_done` those
        taken back that did not see that image start. Keeps `_seen` up to date."""
        index = kwargs.get("index")
        if name == "wbc_image_start":
            for seen in self._seen.values():
                seen.add(index)
        if name != "wbc_image_done" or not self._seen:
            return list(self.left_out)
        late = [impl.plugin for impl in self.pm.hook.wbc_image_done.get_hookimpls()
                if id(impl.plugin) in self._seen and index not in self._seen[id(impl.plugin)]]
        for seen in self._seen.values():
            seen.discard(index)
        return list(self.left_out) + [p for p in late if not self._out(p)]

    def __call__(self, name: str, **kwargs) -> None:
        if self.pm is None:
            return
        self._readmit(name, kwargs)
        skipped = self._skipped(name, kwargs)
        impls = getattr(self.pm.hook, name).get_hookimpls()
        if any(_is_wrapper(impl) for impl in impls):
            caller = (self.pm.subset_hook_caller(name, skipped) if skipped
                      else getattr(self.pm.hook, name))
            try:
                caller(**kwargs)
            except PLUGIN_FAILURES as exc:
                reraise_stops(exc)
                impl = _culprit(caller, exc)
                self._failed(f"plugin {impl.plugin_name!r}" if impl else "a plugin", name, exc)
                if impl is not None:
                    self._leave_out(impl.plugin, name)
            return
        for impl in reversed(impls):  # pluggy calls the last registered first
            if any(p is impl.plugin for p in skipped):
                continue
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except PLUGIN_FAILURES as exc:  # a progress or logging plugin's bug
                reraise_stops(exc)
                self._failed(f"plugin {impl.plugin_name!r}", name, exc)
                self._leave_out(impl.plugin, name)

    def _failed(self, who: str, name: str, exc: BaseException) -> None:
        if name == "wbc_run_end":  # the last call: nothing goes on after it
            log.warning("%s failed in %s: %s: %s; the reports stand as written", who, name,
                        type(exc).__name__, exc)
            return
        if self.retry_after is None:
            until = ""
        elif _for_good(name):
            until = " until it is started again"
        else:
            until = f" for {_duration(self.retry_after)}, then tries it again"
        log.warning("%s failed in %s: %s: %s; the run goes on without its lifecycle hooks%s",
                    who, name, type(exc).__name__, exc, until)


def _for_good(hook: str) -> bool:
    """Whether a plugin failing in `hook` is left out for the rest of the run, even in a watcher:
    in `wbc_run_start` it could not set itself up for the run, which is not started again."""
    return hook == "wbc_run_start"


def _duration(seconds: float) -> str:
    """"10 minutes", "1 minute", "30 seconds"."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


def _warn_unmarked(pm, plugin, name: str) -> None:
    """A function of `plugin` named like a hook (or nearly: a misspelling) but not marked
    `@hookimpl` is never called, which pluggy does not say: say it, once per plugin and name."""
    import difflib
    import inspect

    function = getattr(plugin, name, None)
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        return
    module = getattr(plugin, "__name__", None) if inspect.ismodule(plugin) else None
    if module is not None and function.__module__ != module:
        return  # imported from elsewhere, not the plugin's own
    hooks = [h for h in dir(hookspecs) if h.startswith("wbc_")]
    close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.85)
    if not close:
        return
    key = (getattr(plugin, "__name__", type(plugin).__name__), name)
    if key in _unmarked_warned:
        return
    _unmarked_warned.add(key)
    like = "" if close[0] == name else f" (the hook is {close[0]})"
    log.warning("plugin %s: %s%s is not marked @hookimpl, so wbc-batch never calls it",
                key[0], name, like)


_unmarked_warned = set()  # (plugin, name) already warned about, so a process warns once


def _culprit(caller, exc: BaseException):
    """The hook implementation whose code raised `exc`: its frame (decorators unwrapped; for a
    method, with its own instance as first argument) is in the traceback. Wrappers come last:
    the exception passes through every wrapper's frame on its way out."""
    import inspect

    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    impls = caller.get_hookimpls()
    for impl in sorted(impls, key=_is_wrapper):
        code = getattr(inspect.unwrap(impl.function), "__code__", None)
        owner = getattr(impl.function, "__self__", None)
        for frame in frames:
            if frame.f_code is not code:
                continue
            first = frame.f_code.co_varnames[0] if frame.f_code.co_argcount else None
            if owner is None or (first is not None and frame.f_locals.get(first) is owner):
                return impl
    return None


def _is_wrapper(impl) -> bool:
    return bool(getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False))


def get_plugin_manager(autoload: bool | None = None, keep_broken: bool = False) -> PluginManager:
    """A new plugin manager with the built-ins and (unless disabled) the entry-point plugins.

    :param autoload: load `wbc_batch` entry points; None (the default) means "unless
        WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD says so" (`autoload_disabled`).
    :param keep_broken: a plugin that cannot be loaded or brings a fault (module docstring) is
        left out (its offending entries or commands) and listed in `broken_plugins(pm)` instead
        of raising (for the command line's diagnostics); the registries are collected once here
        to find their faults.
    :raises PluginError: a built-in plugin cannot be imported; without `keep_broken`, also a
        third party's that fails to import or implements a hook that does not exist, or two
        entry points named alike.
    """
    pm = PluginManager(PROJECT)
    pm.keep_broken = keep_broken
    pm.add_hookspecs(hookspecs)
    for name, module_name in BUILTINS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"built-in plugin {name!r} ({module_name}) cannot be imported: {exc}; "
                              "reinstall wbc-batch (pip install --force-reinstall, of the "
                              "wheel or of the checkout)") from exc
        pm.register(module, name=name)
    _check_pending(pm)
    if autoload is None:
        autoload = not autoload_disabled()
        pm.autoload_off = not autoload
    if autoload:
        _block_disabled(pm)
        clashes = [(name, why) for name, why in name_clashes() if not pm.is_blocked(name)]
        if clashes and not keep_broken:
            raise PluginError(clashes[0][1])
        builtin = dict(BUILTINS)
        for name, reason in clashes:  # neither of two third parties named alike is loaded
            pm.broken.append((name, reason))
            if name not in builtin:
                pm.set_blocked(name)
        pm.broken += load_entry_points(pm)
        if pm.broken and not keep_broken:
            raise PluginError(pm.broken[0][1])
    if keep_broken:
        check_registries(pm)
    return pm


def disabled_plugins() -> list:
    """The entry-point names WBC_BATCH_DISABLE_PLUGINS lists (commas or spaces between them)."""
    return [name for name in re.split(r"[\s,]+", os.environ.get(DISABLE_PLUGINS_ENV, "")) if name]


def _block_disabled(pm) -> None:
    """Keep the third-party plugins WBC_BATCH_DISABLE_PLUGINS names from loading (as pytest's
    `-p no:NAME`): a lab can go on without one broken plugin and keep the others. A built-in's
    name, or one that no installed plugin has (a typo), is said in a warning."""
    import importlib.metadata

    names = disabled_plugins()
    if not names:
        return
    installed = {ep.name for dist in importlib.metadata.distributions()
                 for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    for name in names:
        if name in dict(BUILTINS):
            _warn_once(f"{DISABLE_PLUGINS_ENV} names {name!r}, a built-in plugin, which cannot "
                       f"be switched off; third-party plugins it names are switched off")
        elif name not in installed:
            _warn_once(f"{DISABLE_PLUGINS_ENV} names {name!r}, but no installed plugin has that "
                       f"name (`wbc-batch plugins` lists them)")
        else:
            pm.set_blocked(name)
            pm.switched_off.append(name)


def _warn_once(text: str) -> None:
    if text not in _warned_values:
        _warned_values.add(text)
        log.warning("%s", text)


def _check_pending(pm) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc


def load_entry_points(pm) -> list:
    """Register the plugins of the `wbc_batch` entry-point group that `pm` does not have yet,
    one entry point at a time, as pluggy does (the first distribution offering a name wins).

    :returns: [(entry-point name, one-line reason)] for those that could not be loaded (their
        import raised, sys.exit() included, or pluggy refused a hook: an unknown hook name,
        wrong arguments); they are left out, and the others are loaded all the same.
    """
    import importlib.metadata

    broken = []
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if (ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None
                    or pm.is_blocked(ep.name) or any(name == ep.name for name, _ in broken)):
                continue
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
                pm.check_pending()
            except PLUGIN_FAILURES as exc:  # whatever a third party's import raises
                reraise_stops(exc)
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                broken.append((ep.name, _broken_message(ep, dist, exc)))
                continue
            _warn_if_idle(pm, ep, dist)
    return broken


def _warn_if_idle(pm, ep, dist) -> None:
    """Say, once, that the plugin loaded from entry point `ep` implements no hook, so wbc-batch
    never calls it: its entry point names a package whose hooks are in a submodule, or a report
    writer (backend, truth reader) itself rather than the module whose hook returns it (pluggy
    does not say so)."""
    plugin = pm.get_plugin(ep.name)
    if plugin is None or pm.get_hookcallers(plugin):
        return
    dist_name = str(dist.metadata["name"] or "?")
    _warn_once(f"plugin {ep.name!r} ({ep.value}, from {dist_name}) implements no wbc-batch "
               f"hook, so wbc-batch never calls it: its entry point must name the module or "
               f"object that holds the @hookimpl functions (for a package, the submodule that "
               f"has them: '{ep.value.split(':')[0]}.<submodule>'), not a report writer, backend "
               f"or truth reader itself, which a hook returns")


def _broken_message(ep, dist, exc: BaseException) -> str:
    """One line naming the entry point, its module and its distribution, and what went wrong."""
    dist_name = str(dist.metadata["name"] or "?")
    reason = _one_line(exc)
    return (f"the {ENTRY_POINT_GROUP!r} plugin {ep.name!r} ({ep.value}, from {dist_name} "
            f"{getattr(dist, 'version', '?')}) cannot be loaded: {type(exc).__name__}: {reason}; "
            f"fix or uninstall {dist_name}, or {skip_hint(None, ep.name)}")


def broken_plugins(pm) -> list:
    """[(plugin name, one-line reason)] of the plugins `pm` could not load or that bring a fault
    (see `get_plugin_manager(keep_broken=True)`); [] for any other plugin manager."""
    return list(getattr(pm, "broken", ()))


def _fault(pm, plugin_name: str, reason: str, cause: BaseException | None = None) -> None:
    """A plugin's fault: PluginError, or, where `pm` keeps broken plugins, one more entry of
    `pm.broken` (once: the registries may be collected again) and the caller goes on without
    the offending entries."""
    if not getattr(pm, "keep_broken", False):
        raise PluginError(reason) from cause
    if (plugin_name, reason) not in pm.broken:
        pm.broken.append((plugin_name, reason))


def autoload_note(pm) -> str:
    """For a message about a name no plugin offers: "; third-party plugins are switched off by
    WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD" where `pm` was built without them for that reason, or the
    plugins WBC_BATCH_DISABLE_PLUGINS kept out, else "" (it may be a third party's name)."""
    if getattr(pm, "autoload_off", False):
        return f"; third-party plugins are switched off by {DISABLE_AUTOLOAD_ENV}"
    if getattr(pm, "switched_off", None):
        return f"; {DISABLE_PLUGINS_ENV} switches off {', '.join(map(repr, pm.switched_off))}"
    return ""


_DISABLE_WORDS = ("1", "true", "yes", "on", "y")
_ENABLE_WORDS = ("0", "false", "no", "off", "n", "")
_warned_values = set()   # the unknown values already warned about, so a process warns once


def autoload_disabled() -> bool:
    """Whether WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD asks to start without third-party plugins: 1,
    true, yes, on or y, in any case. 0, false, no, off, n, empty or unset leave autoload on, so
    that `=0` does not do the opposite of what it says. Any other value disables it, as every
    non-empty value once did, with one warning naming the value and the accepted ones."""
    raw = os.environ.get(DISABLE_AUTOLOAD_ENV, "")
    value = raw.strip().lower()
    if value in _DISABLE_WORDS or value in _ENABLE_WORDS:
        return value in _DISABLE_WORDS
    if raw not in _warned_values:
        _warned_values.add(raw)
        log.warning("%s=%r is none of %s (disable) or %s (keep on); taken as disable",
                    DISABLE_AUTOLOAD_ENV, raw, ", ".join(_DISABLE_WORDS),
                    ", ".join(w or "empty" for w in _ENABLE_WORDS))
    return True


def name_clashes() -> list:
    """pluggy skips, without a word, an entry point whose name is already registered: a third
    party's plugin named `csv` (a built-in's name) or named like another third party's would
    silently not load. -> [(entry-point name, one-line reason naming both distributions)], one
    per name."""
    import importlib.metadata

    seen = {name: ("wbc-batch", "wbc-batch (built in)") for name, _ in BUILTINS}
    clashes = {}
    for dist in importlib.metadata.distributions():  # as pluggy looks them up
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP and ep.name not in clashes:
                reason = _check_name(ep.name, str(dist.metadata["name"] or "?"), seen)
                if reason:
                    clashes[ep.name] = reason
    return list(clashes.items())


def _canonical(dist: str) -> str:
    """A distribution name as pip compares them (PEP 503): Acme_CSV is acme-csv."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _check_name(name: str, dist: str, seen: dict) -> str:
    """The clash of entry point `name` of `dist` with one `seen` before, or ""."""
    key = _canonical(dist)
    if name in seen and seen[name][0] != key:  # one distribution seen twice on sys.path is fine
        return (f"two {ENTRY_POINT_GROUP!r} plugins are named {name!r}: {seen[name][1]} and "
                f"{dist}; rename one entry point, uninstall one, or {skip_hint(None, name)}")
    seen.setdefault(name, (key, dist))
    return ""


def register_commands(pm, cli) -> None:
    """Call `wbc_register_commands` plugin by plugin: one that raises, or that replaces or
    removes a command another plugin (or the core) added, is a fault naming it (`_fault`:
    PluginError, or with `keep_broken` listed in `pm.broken`, the commands as they were before
    its call). With a wrapper implementation the hook is called as a whole (the error then
    names the command)."""
    impls = pm.hook.wbc_register_commands.get_hookimpls()
    if any(_is_wrapper(impl) for impl in impls):
        calls = [("wbc_register_commands", "a plugin",
                  lambda: pm.hook.wbc_register_commands(cli=cli))]
    else:  # registration order: the built-ins' commands first
        calls = [(impl.plugin_name, f"plugin {impl.plugin_name!r}",
                  lambda impl=impl: impl.function(**{arg: cli for arg in impl.argnames}))
                 for impl in impls]
    for name, who, call in calls:
        before = dict(cli.commands)
        try:
            call()
        except PLUGIN_FAILURES as exc:  # a third party's bug, sys.exit() too: name it, do not crash
            reraise_stops(exc)
            _restore_commands(cli, before)
            _fault(pm, name, f"{who} failed in wbc_register_commands: {type(exc).__name__}: "
                             f"{_one_line(exc)}; {skip_hint(pm, name)}", exc)
            continue
        changed = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
        if changed:
            _restore_commands(cli, before)
            _fault(pm, name, f"{who} replaces or removes the command {changed[0]!r}, which "
                             f"wbc-batch already has; {skip_hint(pm, name)}")


def _restore_commands(cli, before: dict) -> None:
    """Put back the commands of `cli` as they were (in their order), leaving out a faulty
    plugin's."""
    cli.commands.clear()
    cli.commands.update(before)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (a message may span several)."""
    return " ".join(str(exc).split()) or "(no message)"


# --- registries ---------------------------------------------------------------------------------

def collect(pm: pluggy.PluginManager, hook_name: str, what: str, needs: tuple = ()) -> dict:
    """Call a registration hook and gather what it returns into `{obj.name: obj}`.

    :param hook_name: e.g. "wbc_register_backends".
    :param what: a word for error messages ("backend").
    :param needs: the methods each object must have ("write",), so that a writer without one,
        or a class offered instead of an instance, is found now, not after a whole batch.
    :raises PluginError: a plugin's hook raised, two objects with the same name (the first
        registered, a built-in's, wins), an object without a name, a class, or one without
        the methods `needs` names. Where `pm` keeps broken plugins, the fault is listed in
        `pm.broken` instead and the offending entries are left out (all of a hook that raised).
    """
    cache = getattr(pm, "registries", None)
    if cache is not None and hook_name in cache:
        return dict(cache[hook_name])
    hook = getattr(pm.hook, hook_name)
    found, owners = {}, {}
    # in registration order, built-ins first: get_hookimpls() puts a `trylast` or `tryfirst`
    # implementation out of it, which would let a third party's `csv` win over the built-in
    order = {name: i for i, (name, _) in enumerate(pm.list_name_plugin())}
    for impl in sorted(hook.get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, len(order))):
        if _is_wrapper(impl):
            continue
        plugin = impl.plugin_name
        try:
            returned = impl.function()
            not_a_list = returned is not None and (isinstance(returned, (str, bytes, Mapping))
                                                   or not isinstance(returned, Iterable))
            offered = [] if not_a_list else list(returned or ())  # a generator's body runs here
        except PLUGIN_FAILURES as exc:  # a third party's bug, sys.exit() too: name it, do not crash
            reraise_stops(exc)
            _fault(pm, plugin, f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: "
                               f"{_one_line(exc)}; {skip_hint(pm, plugin)}", exc)
            continue
        if not_a_list:
            # one writer instead of a list of them read as the plugin's own TypeError
            kind = f"{type(returned).__module__}.{type(returned).__qualname__}"
            _fault(pm, plugin, f"plugin {plugin!r}'s {hook_name} returned a {kind}, not a list "
                               f"of {what}s; {skip_hint(pm, plugin)}", None)
            continue
        for obj in offered:
            name = getattr(obj, "name", None)
            missing = [m for m in needs if not callable(getattr(obj, m, None))]
            if not isinstance(name, str) or not name:
                kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
                _fault(pm, plugin, f"plugin {plugin!r} offers a {what} without a name (a {kind}); "
                                   f"{skip_hint(pm, plugin)}")
            elif name in found:
                _fault(pm, plugin, f"two plugins offer a {what} named {name!r}: "
                                   f"{owners[name]!r} and {plugin!r}; {skip_hint(pm, plugin)}")
            elif isinstance(obj, type) or missing:
                why = (f"the class {obj.__qualname__}, not an instance of it" if isinstance(obj, type)
                       else f"without {', '.join(m + '()' for m in missing)}")
                _fault(pm, plugin, f"plugin {plugin!r} offers the {what} {name!r} {why}; "
                                   f"{skip_hint(pm, plugin)}")
            else:
                found[name] = obj
                owners[name] = plugin
    if cache is not None:
        cache[hook_name] = dict(found)
        cache[(hook_name, "owners")] = dict(owners)
    return found


def third_party_owners(pm, hook_name: str) -> dict:
    """`{registered name: plugin name}` of the entries of the registry `hook_name` that a third
    party's plugin offers (for `wbc-batch plugins`, so that a writer named in a failure can be
    traced to the plugin that WBC_BATCH_DISABLE_PLUGINS would name); {} where `pm` keeps no
    registries."""
    {"wbc_register_backends": get_backends, "wbc_register_report_writers": get_report_writers,
     "wbc_register_truth_readers": get_truth_readers}[hook_name](pm)  # collected, as checked
    owners = getattr(pm, "registries", {}).get((hook_name, "owners"), {})
    builtin = dict(BUILTINS)
    return {name: plugin for name, plugin in owners.items() if plugin not in builtin}


def check_registries(pm) -> None:
    """Collect every registry once, so that their faults are found (raised, or listed in
    `pm.broken` where it keeps broken plugins) before any command runs."""
    get_backends(pm)
    get_report_writers(pm)
    get_truth_readers(pm)


def get_backends(pm) -> dict:
    """`{name: Backend}` from `wbc_register_backends`."""
    return collect(pm, "wbc_register_backends", "backend", needs=("open",))


def backend_availability(backend) -> tuple:
    """`backend.availability()` as `(usable, detail)`, never raising: `usable` is None where the
    check itself failed (it raised, called sys.exit(), or answered something other than a
    `(usable, detail)` pair), and `detail` then says how. `run` goes on past a failed check
    (opening the backend then says what is wrong); `plugins` lists it as not usable."""
    from .results import one_line

    try:
        answer = backend.availability()
    except PLUGIN_FAILURES as exc:
        reraise_stops(exc)
        return None, f"availability check failed: {type(exc).__name__}: {one_line(exc)}"
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        shown = " ".join(repr(answer).split())
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return None, f"availability check failed: it answered {shown}, not a (usable, detail) pair"
    usable, detail = answer
    return bool(usable), str(detail).strip()


def get_report_writers(pm) -> dict:
    """`{name: ReportWriter}` from `wbc_register_report_writers`."""
    return collect(pm, "wbc_register_report_writers", "report writer", needs=("write",))


def get_truth_readers(pm) -> dict:
    """`{name: TruthReader}` from `wbc_register_truth_readers`."""
    return collect(pm, "wbc_register_truth_readers", "truth reader", needs=("can_read", "read"))


def describe_plugins(pm) -> list:
    """`[(plugin name, where it comes from)]`, built-ins first, then by name (a name blocked
    because two distributions use it is left out: `broken_plugins` lists it)."""
    builtin = dict(BUILTINS)
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        if name in builtin:
            rows.append((0, name, f"built-in ({builtin[name]})"))
            continue
        dist = dists.get(id(plugin))
        if dist is not None:
            source = f"{dist.project_name} {dist.version}"
        else:
            source = getattr(plugin, "__name__", type(plugin).__name__)
        rows.append((1, name, source))
    return [(name, source) for _, name, source in sorted(rows)]
