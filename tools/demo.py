"""The main job on built-in defaults (``make demo``): a demo product end to end, offline, on a CPU.

1. build a small product dataset from images that scikit-image ships, with procedural defects and masks
2. fit the fast profile: coreset bank, PCA, references, and the residual Swin trained on good images and
   synthetic anomalies (fewer steps than the profile's default, so the demo stays short); export a bundle
3. check the bundle
4. inspect the test images with the edge runtime (results.jsonl + heatmaps)
5. evaluate: image AUROC, pixel AUROC, PRO, pixel AP, detection at a false-reject rate, overall and per
   defect type (metrics.json, curves.png and the one-page report.html)
6. benchmark the edge inference path
7. run the edge service end to end: the bundle in an edge bundle store, ``weakrest-edge run`` with a
   replay camera over the test images, a broker on loopback (Mosquitto when installed, otherwise the
   embedded amqtt), a subscriber standing in for the MES that prints the verdicts it receives, and the
   live operator page on the health port
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_fresh_process(edge_args: list[str]) -> int:
    """``weakrest-edge ARGS`` in its own process: the training's torch threads and memory stay out of it."""
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *edge_args], check=False).returncode


def run_service(bundle: Path, images: Path, out: Path, seconds: float, broker_impl: str, health_port: int) -> int:
    """The service as the line runs it, for ``seconds``, then SIGTERM (queue flushed, offline)."""
    import json
    import signal

    import yaml

    from edge_runtime.core.bundle import load_bundle
    from edge_runtime.publishing.broker import LocalBroker
    from edge_runtime.publishing.subscriber import Subscriber
    from edge_runtime.store import BundleStore

    product = load_bundle(bundle).manifest.product
    edge = out / "edge"
    store = BundleStore(edge / "store")
    version = store.current(product)
    if version is None or not (store.product_dir(product) / version).is_dir():
        store.activate(product, store.add(product, bundle, version=time.strftime("%Y%m%d-%H%M%S")))
    prefix = "demo/line1/station1"
    with LocalBroker(impl=broker_impl, workdir=edge / "broker") as broker:
        broker.start()
        print(f"      broker: {broker.impl} on 127.0.0.1:{broker.port}", flush=True)
        counts = {"pass": 0, "fail": 0, "error": 0}

        def show(client, userdata, msg) -> None:
            body = json.loads(msg.payload)
            if msg.topic.endswith("/status"):
                print(f"      status: {body.get('state')} {body.get('product', '')}@{body.get('bundle_version', '')} "
                      f"camera {body.get('camera_state', '-')}", flush=True)
                return
            counts[body["verdict"]] += 1
            print(f"      result seq {body['seq']:>3} frame {body['frame_id']:>3}: {body['verdict']:<5} score "
                  f"{body['score'] if body['score'] is None else round(body['score'], 4)} (threshold "
                  f"{body['threshold']:.4f}), {len(body['regions'])} region(s), "
                  f"{body['timings_ms'].get('total', 0):.1f} ms", flush=True)

        sub = Subscriber(broker.port, [f"{prefix}/result", f"{prefix}/status"],
                         protocol=broker.protocol)
        sub.client.on_message = show
        config = {"bundles": {"store": str(store.root.resolve()), "product": product},
                  "camera": {"source": "replay", "name": "replay0", "replay": {"path": str(images.resolve()),
                                                                                "fps": 4}},
                  "mqtt": {"port": broker.port, "topic_prefix": prefix, "heatmap": "fail"},
                  "queue": {"dir": str((edge / "queue").resolve())}, "health": {"port": health_port}}
        (edge / "edge.yaml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(edge / "edge.yaml"),
                                 "--log-level", "WARNING"])
        print(f"      live page: http://127.0.0.1:{health_port}/ (open it while the service runs)", flush=True)
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        time.sleep(0.5)
        sub.close()
    print(f"      service stopped (exit {code}): {sum(counts.values())} results received, {counts['pass']} pass, "
          f"{counts['fail']} fail, {counts['error']} error; config {edge / 'edge.yaml'}", flush=True)
    return code if sum(counts.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="working folder")
    parser.add_argument("--product", choices=["texture", "object"], default="texture")
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--swin-steps", type=int, default=500, help="Swin training steps (the fast profile has 3000)")
    parser.add_argument("--service-seconds", type=float, default=15.0, help="how long the edge service runs")
    parser.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    args = parser.parse_args(argv)

    from edge_runtime import cli as edge_cli
    from edge_runtime.publishing.broker import free_port
    from training_host import cli as train_cli
    from training_host.data.demo_data import make_demo_dataset

    out = Path(args.out)
    t0 = time.perf_counter()
    bundle = out / "bundle"
    health_port = free_port()
    data = out / "data"

    def build_data(_: list[str]) -> int:
        make_demo_dataset(data, product=args.product)
        return 0

    steps = [
        (f"building the demo '{args.product}' dataset", build_data, []),
        (
            "fitting the fast profile (bank, PCA, references, residual Swin)",
            train_cli.main,
            [
                "fit",
                "--config",
                args.config,
                "--data",
                str(data),
                "--out",
                str(bundle),
                "--product",
                f"demo-{args.product}",
                "--set",
                f"swin.steps={args.swin_steps}",
                "--synthetic-preview",
                str(out / "synthetic_anomalies.png"),
            ],
        ),
        ("checking the bundle", edge_cli.main, ["check-bundle", str(bundle)]),
        (
            "inspecting the test images on the edge runtime",
            edge_cli.main,
            [
                "inspect",
                "--bundle",
                str(bundle),
                "--images",
                str(data / "test"),
                "--out",
                str(out / "inspect"),
                "--heatmaps",
                "fail",
            ],
        ),
        (
            "evaluating",
            train_cli.main,
            ["eval", "--bundle", str(bundle), "--data", str(data), "--out", str(out / "eval")],
        ),
        (
            "benchmarking batch-1 inference (a fresh process, as the edge runs it: no torch loaded)",
            _in_fresh_process,
            ["bench", "--bundle", str(bundle), "--images", str(data / "test"), "--frames", "100"],
        ),
        (
            "running the edge service: replay camera -> inspection -> MQTT -> a subscriber (the MES stand-in)",
            lambda _: run_service(bundle, data / "test", out, args.service_seconds, args.broker, health_port), [],
        ),
    ]
    for number, (title, func, cmd) in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {title}", flush=True)
        code = func(cmd)
        if code not in (0,):
            print(f"demo step failed ({title}): exit {code}", file=sys.stderr)
            return code
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s: bundle {bundle}, heatmaps {out / 'inspect' / 'heatmaps'}, "
        f"metrics {out / 'eval' / 'metrics.json'}, curves {out / 'eval' / 'curves.png'}, "
        f"synthetic anomalies {out / 'synthetic_anomalies.png'}\n"
        f"evaluation report: {(out / 'eval' / 'report.html').resolve()} (open it in a browser)\n"
        f"live page: http://127.0.0.1:{health_port}/ while the service runs "
        f"(weakrest-edge run --config {out / 'edge' / 'edge.yaml'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
