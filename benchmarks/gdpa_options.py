"""The GDPA forward's launch options as benchmark flags (no torch, no attnkit: bench_before_after
imports it before choosing which build's attnkit to load). The names are the private op
_gdpa_fwd_with's options (docs/ops.md, GDPA "Kernel choice")."""

FWD_OPTIONS = ("ping_pong", "split_loaders", "persistent", "sorted", "resident_kv")


def parse_fwd_options(text, flag="--fwd-options"):
    """"ping_pong=0,sorted=0" -> {"ping_pong": False, "sorted": False}; a bad item ends the run
    with a message naming `flag`."""
    opts = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in FWD_OPTIONS or value not in ("0", "1"):
            raise SystemExit(f"{flag}: expected NAME=0|1 with NAME in {FWD_OPTIONS}, got {item!r}")
        opts[name] = value == "1"
    return opts
