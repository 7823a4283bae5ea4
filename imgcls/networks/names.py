"""The names --model takes, known without importing torch: a misspelled model is answered, and the names
listed, in a fraction of a second.

Listing torchvision's classifiers means importing torchvision (seconds), and timm's means importing timm
(longer still). Both lists are computed once and kept in the cache folder, in a file keyed by the
package's version and the identity of its installed module, so a new version (or a reinstall) is listed
afresh and an old list is never served for it. A damaged file is computed again.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable

from imgcls.errors import UsageError
from imgcls.files import atomic_write_text
from imgcls.settings import cache_path

PREFIX = "timm/"
NO_TIMM = "timm models need the timm package: pip install timm (or pip install -r requirements-timm.txt)"


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # a module set to None in sys.modules: as if not installed
        return False


def package_key(package: str) -> str | None:
    """The installed package's version and the identity of its module file; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
        version = importlib.metadata.version(package)
    except (ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or spec.origin is None:
        return None
    st = os.stat(spec.origin)
    return f"{version}-{st.st_size}-{st.st_mtime_ns}"


def cached(package: str, compute: Callable[[], dict[str, list[str]]], cache_dir: str | None) -> dict[str, list[str]]:
    """`compute()` for the installed `package`, from the cache folder when it was computed for this very
    version; computed and kept there otherwise (a cache folder that cannot be written only costs time)."""
    key = package_key(package)
    path = cache_path(cache_dir) / "model-names" / f"{package}-{key}.json"
    try:
        names = json.loads(path.read_text())
        if isinstance(names, dict) and all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                           for v in names.values()):
            return names
    except (OSError, ValueError):
        pass
    names = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(names))
    except OSError:
        pass
    return names


def list_torchvision() -> dict[str, list[str]]:
    import torchvision

    return {"models": sorted(torchvision.models.list_models(module=torchvision.models))}


def list_timm() -> dict[str, list[str]]:
    """timm's architectures as it lists them ("models") and those it still builds under an old name
    ("deprecated"); its named weights as it lists them ("pretrained") and every NAME.TAG it loads ("weights")."""
    import timm
    from timm.models import get_arch_pretrained_cfgs, get_deprecated_models

    models, deprecated = list(timm.list_models()), list(get_deprecated_models())
    return {"models": models, "deprecated": deprecated, "pretrained": list(timm.list_pretrained()),
            "weights": [n for arch in models + deprecated for n in get_arch_pretrained_cfgs(arch)]}


def torchvision_names(cache_dir: str | None = None) -> list[str]:
    """torchvision's classification models (what --model takes without a prefix)."""
    return cached("torchvision", list_torchvision, cache_dir)["models"]


def timm_names(cache_dir: str | None = None) -> dict[str, list[str]]:
    """timm's architectures ("models") and named weights ("pretrained", NAME.TAG), without the prefix."""
    if not installed("timm"):
        raise UsageError(NO_TIMM)
    return cached("timm", list_timm, cache_dir)


def closest(name: str, names: list[str], prefix: str = "") -> str:
    """ "did you mean a, b or c?" for the three names closest to `name`, or "" when none is close."""
    close = [prefix + c for c in difflib.get_close_matches(name, names, n=3, cutoff=0.6)]
    if not close:
        return ""
    return "did you mean " + (f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else close[0]) + "?"


def unknown_torchvision(name: str, names: list[str]) -> str:
    hint = closest(name, names)
    return (f"unknown model '{name}': " + (f"{hint} " if hint else "") +
            f"(python train.py --list-models lists the {len(names)} torchvision models, and timm/NAME with timm "
            "installed)")


def unknown_timm(base: str, names: list[str]) -> str:
    hint = closest(base, names, PREFIX)
    return f"unknown timm model '{base}'" + (f": {hint}" if hint else "") + \
        " (python train.py --list-models 'timm/*' lists them)"


def unknown_tag(base: str, tag: str, weights: list[str]) -> str:
    tags = [p.partition(".")[2] for p in weights if p.partition(".")[0] == base]
    return f"timm has no weights '{tag}' for {base}: " + \
        (f"choose one of {', '.join(tags)}" if tags else "it has no pretrained weights")


def check(name: str, cache_dir: str | None = None) -> None:
    """A name --model takes, or a one-line error with the closest names: checked from the cached lists."""
    if not name.startswith(PREFIX):
        names = torchvision_names(cache_dir)
        if name not in names:
            raise UsageError(unknown_torchvision(name, names))
        return
    timm = timm_names(cache_dir)
    base, _, tag = name[len(PREFIX):].partition(".")
    if base not in timm["models"] and base not in timm["deprecated"]:
        raise UsageError(unknown_timm(base, timm["models"]))
    if tag and f"{base}.{tag}" not in timm["weights"]:
        raise UsageError(unknown_tag(base, tag, timm["weights"]))


def matching(pattern: str = "*", cache_dir: str | None = None) -> list[str]:
    """What --model takes, matching a shell-style `pattern`: torchvision's classifiers, then timm's
    architectures when timm is installed (matched with and without their timm/ prefix; a pattern with a
    dot lists their named weights, NAME.TAG)."""
    found = [n for n in torchvision_names(cache_dir) if fnmatch.fnmatch(n, pattern)]
    if pattern.startswith(PREFIX) or installed("timm"):
        timm = timm_names(cache_dir)
        for n in timm["models"] + (timm["pretrained"] if "." in pattern else []):
            if fnmatch.fnmatch(PREFIX + n, pattern) or fnmatch.fnmatch(n, pattern):
                found.append(PREFIX + n)
    return found
