"""`fedmm`: deploy a federation across sites, a thin wrapper over Flower's own commands.

    fedmm certs    --out certs --server-host fl.example.org --site clinic-a --site clinic-b
    fedmm server   --certs certs                      # SuperLink: TLS, node auth, state DB
    fedmm site     --superlink fl.example.org:9093 --ca ca.crt --key clinic-a.key \\
                   --data /data/train.csv             # SuperNode serving the ClientApp
    fedmm train    --superlink fl.example.org:9093 --ca certs/ca.crt [hydra overrides]
    fedmm train    --superlink ... --ca ... --resume runs/RUN   # after a crash
    fedmm predict  --adapter runs/RUN/adapter --data /data/new.csv --out preds.csv
    fedmm evaluate --adapter runs/RUN/adapter --data /data/test.csv [--site-column site]
    fedmm evaluate --adapter runs/RUN/adapter --data /data/train.csv --held-out  # a site's own
    fedmm export   --adapter runs/RUN/adapter --merge --out served/

Every command prints one line and exits non-zero on a user error (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import keys
from common.certs import CertsError, write_certs
from launcher.processes import BIN, QUIET_FLOWER, DeployError, free_port

DEFAULT_PORT = 9093


def cmd_certs(args: argparse.Namespace) -> int:
    """Write CA, SuperLink certificate and per-site key pairs."""
    paths = write_certs(args.out, args.server_host, args.site, force=args.force)
    print(f"[fedmm] wrote {paths.ca_cert}, {paths.server_cert} (+ keys) and "
          f"{len(paths.site_keys)} site key pair(s) under {Path(args.out) / 'sites'}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Run the SuperLink until stopped."""
    from launcher.deployment import serve

    if args.insecure == bool(args.certs):
        raise DeployError("give --certs DIR (TLS + node authentication) or --insecure")
    certs = Path(args.certs).resolve() if args.certs else None
    keys_ = [Path(k).resolve() for k in args.site_key] or sorted((certs / "sites").glob("*.pub")
                                                         if certs else [])
    if certs and not keys_:
        raise DeployError(f"no site public keys: pass --site-key or put *.pub in {certs}/sites")
    return serve(host=args.host, port=args.port, state_dir=Path(args.state).resolve(), certs=certs,
                 site_keys=keys_)


def site_argv(args: argparse.Namespace) -> list[str]:
    """The flower-supernode command line for one site."""
    data = Path(args.data).expanduser().resolve()
    if not data.is_file():
        raise DeployError(f"{data}: manifest not found")
    node = {keys.DATA_PATH: str(data), keys.SITE_NAME: site_name(args), keys.DEVICE: args.device}
    if args.rank:
        node[keys.LORA_RANK] = args.rank
    if getattr(args, "trainer_socket", None):  # the warm trainer cmd_site starts (client/warm.py)
        node[keys.TRAINER_SOCKET] = args.trainer_socket
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in node.items())
    argv = [str(BIN / "flower-supernode"), "--superlink", args.superlink, "--node-config",
            node_config, "--port", str(args.runtime_port or free_port())]
    for flag in ("max_retries", "max_wait_time"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.insecure:
        return argv + ["--insecure"]
    for flag, path in (("--ca", args.ca), ("--key", args.key)):
        if not path or not Path(path).is_file():
            raise CertsError(f"{flag}: {path} not found (the coordinator sends ca.crt and the "
                             f"site's .key; or run with --insecure)")
    return argv + ["--root-certificates", str(Path(args.ca).resolve()),
                   "--auth-supernode-private-key", str(Path(args.key).resolve())]


def site_name(args: argparse.Namespace) -> str:
    """The site's name: --name, else its key's file name, else its data folder's name."""
    return args.name or (Path(args.key).stem if args.key else Path(args.data).resolve().parent.name)


def cmd_site(args: argparse.Namespace) -> int:
    """Check the site's own data and device, then become its SuperNode (exec: signals reach
    Flower directly)."""
    from common.data import load_manifest
    from common.preflight import check_device

    if not args.cold:
        args.trainer_socket = str(Path(tempfile.mkdtemp(prefix="fedmm-site-")) / "trainer.sock")
    argv = site_argv(args)
    _, stats = load_manifest(args.data)  # every image decoded once; bad rows named, counted
    check_device(args.device)
    print(f"[fedmm] site {site_name(args)}: {stats.rows} usable rows in {args.data}", flush=True)
    env = {**os.environ, **QUIET_FLOWER, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not args.cold:  # keeps torch, the backbone and the data loaded; exits with the SuperNode
        subprocess.Popen([sys.executable, "-m", "client.trainer", "--socket", args.trainer_socket,
                          "--parent-pid", str(os.getpid())], env=env)
    print(f"[fedmm] site {site_name(args)}: connecting to {args.superlink}", flush=True)
    os.execve(argv[0], argv, env)


def cmd_train(args: argparse.Namespace) -> int:
    """Submit a run (or resume one) and wait for it."""
    if args.insecure == bool(args.ca):
        raise DeployError("give --ca CA_CERT (TLS) or --insecure")
    from launcher.deployment import train
    from launcher.outcome import run_summary
    from launcher.prepare import compose, prepare

    cfg = prepare(compose(args.overrides, Path(args.resume) if args.resume else None))
    run = train(cfg, superlink=args.superlink, ca_cert=Path(args.ca) if args.ca else None,
                timeout=args.timeout)
    summary = run_summary(run, Path(cfg.output_dir), resume=f"resume with --resume "
                                                           f"{cfg.output_dir}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def check_inference(args: argparse.Namespace) -> None:
    """Before any model is built: the adapter's files, the manifest, the device, the output."""
    from common.inference import check_adapter
    from common.preflight import check_device, check_output_file, check_writable

    check_adapter(args.adapter)
    if getattr(args, "data", None) and not Path(args.data).is_file():
        raise DeployError(f"{args.data}: manifest not found")
    check_device(getattr(args, "device", "auto"), key="--device")
    if args.command == "export":
        check_writable(args.out, key="--out")
    elif args.out:
        check_output_file(args.out)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict label names for a manifest with the global adapter."""
    from common.inference import load_for_inference, predict_manifest

    check_inference(args)
    n = predict_manifest(load_for_inference(args.adapter), args.data, args.out, args.device)
    print(f"[fedmm] wrote {n} predictions to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the global adapter on a labelled manifest."""
    from common.inference import evaluate_manifest, load_for_inference, run_config_for

    check_inference(args)
    held_out = None
    if args.held_out:  # the rows this site held out in the run, as the run split them
        cfg = run_config_for(Path(args.adapter))
        held_out = (cfg.seed, cfg.partition.holdout_fraction)
    result = evaluate_manifest(load_for_inference(args.adapter), args.data, args.device,
                               site_column=args.site_column, held_out=held_out)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the merged model (LoRA folded into the base weights) for serving."""
    from common.inference import export_merged

    if not args.merge:
        raise DeployError("export: only --merge is supported (the adapter folder itself is "
                          "the unmerged export)")
    check_inference(args)
    print(f"[fedmm] merged model written to {export_merged(args.adapter, args.out)}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The `fedmm` argument parser."""
    p = argparse.ArgumentParser(prog="fedmm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certs", help="CA, SuperLink certificate, per-site key pairs")
    c.add_argument("--out", required=True)
    c.add_argument("--server-host", action="append", required=True,
                   help="DNS name or IP the sites dial (repeatable)")
    c.add_argument("--site", action="append", default=[], help="site name (repeatable)")
    c.add_argument("--force", action="store_true", help="overwrite existing keys")
    s = sub.add_parser("server", help="run the SuperLink (TLS + node auth + state DB)")
    s.add_argument("--certs", help="folder written by `fedmm certs`")
    s.add_argument("--insecure", action="store_true", help="plain text, no node auth")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--state", default="superlink-state", help="folder of the state database")
    s.add_argument("--site-key", action="append", default=[],
                   help="site public key to register (default: CERTS/sites/*.pub)")
    n = sub.add_parser("site", help="run this site's SuperNode")
    n.add_argument("--superlink", required=True, help="HOST:PORT of the server")
    n.add_argument("--data", required=True, help="this site's training manifest")
    n.add_argument("--key", help="this site's private key (from `fedmm certs`)")
    n.add_argument("--ca", help="the federation's ca.crt")
    n.add_argument("--insecure", action="store_true")
    n.add_argument("--name", help="site name (default: the key's file name)")
    n.add_argument("--rank", type=int, default=0, help="this site's LoRA rank (default: run's)")
    n.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    n.add_argument("--runtime-port", type=int, default=0,
                   help="local port of the SuperNode's runtime API (default: a free one)")
    n.add_argument("--cold", action="store_true",
                   help="no warm trainer: every message re-imports and rebuilds the model")
    n.add_argument("--max-retries", type=int)
    n.add_argument("--max-wait-time", type=float)
    t = sub.add_parser("train", help="submit a run to the federation and wait for it")
    t.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}")
    t.add_argument("--ca", help="the federation's ca.crt")
    t.add_argument("--insecure", action="store_true")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last round")
    t.add_argument("--timeout", type=float, default=24 * 3600)
    t.add_argument("overrides", nargs="*", help="Hydra overrides, as for simulations.run")
    for name, helptext in (("predict", "predict label names"), ("evaluate", "score")):
        q = sub.add_parser(name, help=f"{helptext} with the global adapter")
        q.add_argument("--adapter", required=True)
        q.add_argument("--data", required=True)
        q.add_argument("--out", required=name == "predict")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if name == "evaluate":
            q.add_argument("--site-column", default="site",
                           help="report each site of this manifest column (default: site)")
            q.add_argument("--held-out", action="store_true",
                           help="only the rows this site held out in the run (deployed site)")
    e = sub.add_parser("export", help="merge the adapter into the backbone for serving")
    e.add_argument("--adapter", required=True)
    e.add_argument("--merge", action="store_true")
    e.add_argument("--out", required=True)
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause (heavy modules are imported only by the commands that use them)."""
    errors: list[type[Exception]] = [CertsError, DeployError]
    for module, name in (("common.config", "ConfigError"), ("common.data", "ManifestError"),
                         ("common.adapter", "AdapterMismatch"),
                         ("common.inference", "AdapterError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


COMMANDS = {"certs": cmd_certs, "server": cmd_server, "site": cmd_site, "train": cmd_train,
            "predict": cmd_predict, "evaluate": cmd_evaluate, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedmm` console script."""
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # run finally:
    try:
        return COMMANDS[args.command](args)
    except Exception as err:  # noqa: BLE001 - user errors get one line, bugs a traceback
        if not isinstance(err, _user_errors()):
            raise
        print(f"fedmm {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
