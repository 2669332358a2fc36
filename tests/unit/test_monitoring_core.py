"""Monitoring's pure parts: slice features, the inference-log window (nothing dropped silently),
the drift verdict on windows with and without a known shift, alerts to a loopback receiver, the
phantom's other scanner."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.params import defaults, section
from tumorscope.config import MonitorConfig, PhantomBatchConfig, PhantomConfig, ScannerConfig
from tumorscope.errors import UserError
from tumorscope.monitoring import drift, features, windows
from tumorscope.monitoring.alerts import alert_payload, post_webhook


def test_noise_estimate_recovers_the_added_noise_and_ignores_smooth_anatomy():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    smooth = 60 + 0.8 * xx + 0.5 * yy  # a ramp: no noise at all
    noisy = smooth + rng.normal(0, 8.0, smooth.shape)
    found = features.pixel_features(np.stack([smooth, noisy]).clip(0, 255).astype(np.uint8))
    assert found["noise"][0] < 1.0
    assert found["noise"][1] == pytest.approx(8.0, rel=0.15)


def test_blur_lowers_sharpness_and_contrast_is_the_percentile_span():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    sharp = (rng.random((64, 64)) > 0.5).astype(np.float64) * 200 + 20
    blurred = ndimage.gaussian_filter(sharp, 2.0)
    found = features.pixel_features(np.stack([sharp, blurred]).astype(np.uint8)[..., np.newaxis])
    assert found["sharpness"][1] < found["sharpness"][0] / 10
    assert np.allclose(found["contrast"], found["p99"] - found["p1"])


def test_bit_depth_of_source_modes():
    assert [features.bit_depth(m) for m in ("L", "RGB", "I;16", "I;16B", "I", "DICOM", "1")] == [8, 8, 16, 16, 32, 16, 1]


def _log_record(version: str, rng, shift: float = 0.0, dims: int = 4) -> dict:
    image = {name: float(rng.normal(100 + shift, 5)) for name in features.IMAGE_FEATURES}
    return {"timestamp": "t", "endpoint": "classify", "request_id": "r", "model_version": version,
            "predicted_class": "Cyst", "probabilities": {"Cyst": 0.7, "Tumor": 0.3}, "alert": False, "image": image,
            "embedding": rng.normal(0, 1, dims).tolist(), "sha256": rng.bytes(32).hex()}


def test_log_window_counts_every_line_it_leaves_out_and_keeps_reading(tmp_path):
    rng = np.random.default_rng(2)
    log = tmp_path / "inference.jsonl"
    lines = [json.dumps(_log_record("m/1", rng)) for _ in range(5)]
    lines.insert(2, '{"timestamp": "t", "model_version": "m/1", "predic')  # a crash mid-write
    lines.insert(3, json.dumps(_log_record("m/2", rng)))  # a row of the next model version
    lines.insert(4, json.dumps({"model_version": "m/1"}))  # a row without the fields monitoring needs
    lines.insert(5, "\xff\xfe not text")
    lines += [json.dumps(_log_record("m/1", rng)) for _ in range(3)]
    log.write_text("\n".join(lines) + "\n\n")
    window = windows.read_log_window(log, "m/1", size=7, embedding_dims=4)
    assert len(window.frame) == 7
    assert window.left_out["another model version (m/2)"] == 1
    corrupt = {k: v for k, v in window.left_out.items() if k.startswith("corrupt")}
    assert sum(corrupt.values()) == 3 and "corrupt line (no predicted_class)" in corrupt
    crashed_at = log.read_bytes().index(b'{"timestamp": "t", "model_version": "m/1", "predic')
    assert f"{log} (byte {crashed_at}): corrupt line (not JSON)" in window.examples
    # The oldest row, before the window filled, was never read: counted as bytes, not parsed.
    assert window.not_read == {"bytes": len(lines[0]) + 1, "files": 0}
    assert list(window.frame.columns[-6:]) == ["emb_0", "emb_1", "emb_2", "emb_3", "refer", "ood"]
    assert window.frame["confidence"].eq(0.7).all()


def test_a_file_sent_twice_is_one_slice_of_the_window(tmp_path):
    rng = np.random.default_rng(6)
    records = [_log_record("m/1", rng) | {"sha256": f"{i:064x}"} for i in range(4)]
    explained = records[1] | {"endpoint": "explain"}  # classified, then explained
    log = tmp_path / "inference.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [*records, explained]) + "\n")
    window = windows.read_log_window(log, "m/1", size=10, embedding_dims=4)
    assert len(window.frame) == 4
    assert window.left_out == {"repeat of a file already in the window (same SHA-256)": 1}


def test_a_missing_log_is_an_empty_window_not_an_error(tmp_path):
    window = windows.read_log_window(tmp_path / "none.jsonl", "m/1", 100, 4)
    assert window.frame.empty and window.left_out == {"no inference log yet": 1}


def _frame(n: int, rng, shift: float = 0.0) -> pd.DataFrame:
    rows = {name: rng.normal(100 + shift * 10, 10, n) for name in features.IMAGE_FEATURES}
    rows["height"] = np.full(n, 512.0)
    rows["bit_depth"] = np.full(n, 16.0 if shift else 8.0)
    rows["predicted_class"] = rng.choice(["Cyst", "Normal", "Tumor"], n, p=[0.3, 0.5, 0.2])
    rows["confidence"] = rng.uniform(0.6, 1.0, n)
    rows |= {f"emb_{i}": rng.normal(shift, 1, n) for i in range(4)}
    return pd.DataFrame(rows)


def test_drift_verdicts_on_known_windows():
    rng = np.random.default_rng(3)
    reference = _frame(600, rng)
    settings = drift.DriftSettings.of(section(MonitorConfig), min_window=30)
    same = drift.compare(reference, _frame(200, rng), settings).summary
    assert same["status"] == drift.NO_DRIFT and same["drift"] is False
    assert same["features"]["height"]["method"].startswith("constant in reference")
    shifted = drift.compare(reference, _frame(200, rng, shift=1.0), settings).summary
    assert shifted["status"] == drift.DRIFT and shifted["drift"] is True
    assert shifted["embedding"]["drifted"] and "bit_depth" in shifted["drifted_features"]
    assert "mean" in shifted["drifted_features"] and "height" not in shifted["drifted_features"]


def test_a_small_window_gets_no_verdict_and_runs_no_report():
    rng = np.random.default_rng(4)
    result = drift.compare(_frame(300, rng), _frame(10, rng), drift.DriftSettings.of(section(MonitorConfig), min_window=50))
    assert result.summary["status"] == drift.INSUFFICIENT and result.summary["drift"] is None
    assert result.snapshot is None and "10 slices" in result.summary["reason"]


def test_features_missing_from_older_log_rows_are_not_compared():
    rng = np.random.default_rng(5)
    current = _frame(80, rng)
    current.loc[:10, "sharpness"] = np.nan
    used, embeddings, judged = drift.comparable_columns(_frame(100, rng), current)
    assert "sharpness" not in used and judged["not_compared"]["sharpness"].startswith("missing")
    assert embeddings == ["emb_0", "emb_1", "emb_2", "emb_3"]


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_alert_reaches_a_loopback_receiver_and_a_dead_one_is_one_line():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        payload = alert_payload("monitor: DRIFT in x", {"status": "drift", "drift": True, "drifted_features": ["mean"]})
        assert post_webhook(url, payload) == 204
    finally:
        server.shutdown()
        server.server_close()
    content_type, body = _Receiver.received[-1]
    assert content_type == "application/json" and body["text"] == "monitor: DRIFT in x" and body["drift"] is True
    with pytest.raises(UserError, match=r"drift alert to http://127\.0\.0\.1:\d+/hook failed"):
        post_webhook(url, payload, timeout=2)
    with pytest.raises(UserError, match="must be an http"):
        post_webhook("file:///etc/passwd", payload)


def test_other_scanner_batch_differs_where_the_scanner_does(tmp_path):
    phantom = section(PhantomConfig, n_images=40, image_size=64)
    same = section(PhantomBatchConfig, out_dir=str(tmp_path / "same"), n_images=12, scanner="same")
    other = section(PhantomBatchConfig, out_dir=str(tmp_path / "other"), n_images=12, scanner="other",
                               other=section(ScannerConfig, noise_hu=40.0, image_size=80, field_of_view=0.8))
    from tumorscope.data.phantom import generate_batch

    counts = generate_batch(same, phantom)
    assert generate_batch(other, phantom) == counts and sum(counts.values()) == 12

    def read(folder: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).rglob("*.png"))])

    same_pixels, other_pixels = read(same.out_dir), read(other.out_dir)
    assert same_pixels.shape[1:] == (64, 64) and other_pixels.shape[1:] == (80, 80)
    assert np.median(features.pixel_features(other_pixels)["noise"]) > 1.5 * np.median(
        features.pixel_features(same_pixels)["noise"])
    (Path(other.out_dir) / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to delete"):
        generate_batch(other, phantom)


def test_retraining_data_comes_from_labelled_new_slices_only(tmp_path):
    from flows.monitoring import retraining_data

    labelled = tmp_path / "new"
    for label in ("Cyst", "Tumor"):
        (labelled / label).mkdir(parents=True)
    unlabelled = tmp_path / "loose"
    (unlabelled / "scan-0001").mkdir(parents=True)
    params = defaults()
    assert retraining_data(params, str(labelled)) == str(labelled.resolve())
    assert retraining_data(params, str(unlabelled)) is None  # folders that are not classes
    assert retraining_data(params, "logs/inference.jsonl") is None  # a log has no labels
    configured = params.model_copy(update={"monitor": params.monitor.model_copy(update={
        "retrain": params.monitor.retrain.model_copy(update={"new_data": "/data/curated"})})})
    assert retraining_data(configured, str(unlabelled)) == "/data/curated"


def test_log_rows_carry_the_referral_and_the_networks_own_confidence(tmp_path):
    rng = np.random.default_rng(8)
    records = [_log_record("m/1", rng) for _ in range(3)]
    records[0] |= {"refer": True, "ood": True, "raw_probabilities": {"Cyst": 0.9, "Tumor": 0.1}}
    records[1] |= {"refer": False, "ood": False}
    records[2] |= {"refer": None, "ood": None}  # a model without a trust state
    log = tmp_path / "inference.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    frame = windows.read_log_window(log, "m/1", size=10, embedding_dims=4).frame
    assert frame["refer"].tolist()[:2] == [1.0, 0.0] and np.isnan(frame["refer"].iloc[2])
    assert frame["ood"].tolist()[:2] == [1.0, 0.0]
    # The reference's confidence is the network's own: so is the window's, where the log has it.
    assert frame["confidence"].tolist() == [0.9, 0.7, 0.7]


def _referrals(n: int, rate: float, rng) -> pd.DataFrame:
    refer = (rng.random(n) < rate).astype(float)
    return pd.DataFrame({"refer": refer, "ood": refer * (rng.random(n) < 0.5)})


def test_a_referral_rate_well_above_the_reference_is_rising_and_a_like_one_is_not():
    from tumorscope.monitoring.referral_rate import RISING, STEADY, UNKNOWN, referral_line, referral_metrics, referral_summary

    rng = np.random.default_rng(9)
    reference = pd.concat([_referrals(300, 0.10, rng), pd.DataFrame({"refer": [np.nan] * 50})], ignore_index=True)
    same = referral_summary(reference, _referrals(200, 0.10, rng), min_window=50)
    assert same["status"] == STEADY and same["n_reference"] == 300  # training rows (NaN) do not count
    assert abs(same["current_rate"] - 0.10) < 0.06
    risen = referral_summary(reference, _referrals(200, 0.30, rng), min_window=50)
    assert risen["status"] == RISING and risen["p_value"] < 0.01
    assert "REFERRAL RISING: referred 3" in referral_line(risen)
    assert referral_metrics(risen)["referral_rising"] == 1.0 and 0 < referral_metrics(risen)["ood_share"] < 0.3
    small = referral_summary(reference, _referrals(20, 0.9, rng), min_window=50)
    assert small["status"] == UNKNOWN and "min_window" in small["reason"]
    # Every slice referred in both windows (a model unsure of all): a rising OOD share still shows.
    unsure = pd.DataFrame({"refer": np.ones(300), "ood": (rng.random(300) < 0.05).astype(float)})
    strange = pd.DataFrame({"refer": np.ones(120), "ood": (rng.random(120) < 0.6).astype(float)})
    assert referral_summary(unsure, strange, min_window=50)["status"] == RISING
    assert referral_summary(unsure, unsure.iloc[:120], min_window=50)["status"] == STEADY
    unknown = referral_summary(reference.drop(columns=["refer"]), _referrals(200, 0.3, rng), min_window=50)
    assert unknown["status"] == UNKNOWN and "reference" in unknown["reason"]
    assert "referral_rising" not in referral_metrics(unknown)


# ---------------------------------------------------------------------------------------------
# A bounded inference log: rotation, replicas, reading only the newest rows


def test_lines_newest_first_across_block_boundaries(tmp_path):
    from tumorscope.monitoring.log_files import lines_newest_first

    text = b"first\n\nsecond line\n" + b"x" * 37 + b"\nlast without newline"
    path = tmp_path / "log.jsonl"
    path.write_bytes(text)
    for block in (1, 3, 7, 64, 1 << 20):
        found = list(lines_newest_first(path, block))
        assert [line for _, line in found] == [b"last without newline", b"x" * 37, b"second line", b"first"]
        assert all(text[offset:offset + len(line)] == line for offset, line in found)


def test_the_writer_rotates_by_size_and_keeps_its_backups(tmp_path):
    from tumorscope.api.inference_log import InferenceLog

    rng = np.random.default_rng(8)
    log = InferenceLog(tmp_path / "inference.jsonl", max_bytes=4096, backups=3, replica="api-0")
    records = [_log_record("m/1", rng) | {"request_id": f"r{i}"} for i in range(60)]
    for record in records:
        log.submit(record)
        log.flush()
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["inference.jsonl", "inference.jsonl.1", "inference.jsonl.2", "inference.jsonl.3"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    kept = [json.loads(line) for name in reversed(names) for line in (tmp_path / name).read_text().splitlines()]
    assert [r["request_id"] for r in kept] == [r["request_id"] for r in records[-len(kept):]]  # newest, in order
    assert {r["replica"] for r in kept} == {"api-0"} and log.status()["ok"] and log.status()["written"] == 60


def test_replica_ids_name_their_files_and_bad_ones_are_refused(tmp_path):
    from tumorscope.errors import UserError
    from tumorscope.monitoring import log_files

    base = tmp_path / "logs" / "inference.jsonl"
    assert log_files.replica_id(None, {}) is None
    assert log_files.replica_id("a", {log_files.REPLICA_ENV: "pod-7"}) == "pod-7"
    assert log_files.live_path(base, "pod-7") == tmp_path / "logs" / "inference.pod-7.jsonl"
    for bad in ("../x", "a b", "", "-x", "x" * 64):
        with pytest.raises(UserError, match="not a replica id"):
            log_files.replica_id(bad, {}) if bad else log_files.replica_id(None, {log_files.REPLICA_ENV: "a/b"})
    base.parent.mkdir()
    for name in ("inference.jsonl", "inference.jsonl.2", "inference.jsonl.1", "inference.pod-7.jsonl.1",
                 "inference.pod-7.jsonl", "other.jsonl", "inference.jsonl.bak", "inference.jsonl.0"):
        (base.parent / name).write_text("")
    assert {k: [p.name for p in v] for k, v in log_files.log_streams(base).items()} == {
        None: ["inference.jsonl", "inference.jsonl.1", "inference.jsonl.2"],
        "pod-7": ["inference.pod-7.jsonl", "inference.pod-7.jsonl.1"]}


def test_monitoring_reads_the_newest_rows_across_rotated_files_and_replicas(tmp_path):
    """Three rotated files and a corrupt line: the window is the newest rows by time, whatever file
    they are in; the corrupt line among them is counted; older files are left unread, and said so."""
    rng = np.random.default_rng(9)

    def record(i: int, replica: str | None) -> dict:
        return _log_record("m/1", rng) | {"timestamp": f"2026-12-02T10:{i // 60:02d}:{i % 60:02d}Z",
                                          "request_id": f"{replica}-{i}", "replica": replica}

    def write(name: str, rows: list[dict], corrupt_after: int | None = None) -> None:
        lines = [json.dumps(r) for r in rows]
        if corrupt_after is not None:
            lines.insert(corrupt_after, '{"timestamp": "2026-12-02T10:59:59Z", "model_ver')
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    # One unnamed replica with three rotated files (.3 the oldest) and the live file; another replica.
    write("inference.jsonl.3", [record(i, None) for i in range(0, 20)])
    write("inference.jsonl.2", [record(i, None) for i in range(20, 40)])
    write("inference.jsonl.1", [record(i, None) for i in range(40, 60)])
    write("inference.jsonl", [record(i, None) for i in range(60, 66)], corrupt_after=3)
    write("inference.b.jsonl", [record(i, "b") for i in range(50, 70, 2)])
    window = windows.read_log_window(tmp_path / "inference.jsonl", "m/1", size=30, embedding_dims=4)

    assert len(window.frame) == 30 and window.source.endswith("(2 replicas)")
    assert window.left_out["corrupt line (not JSON)"] == 1
    # Each replica's newest 30 rows are read: the unnamed one's 65..36 (live file, .1, part of .2),
    # b's 10. Merged by time, the newest 30 are those at or after 10:00:46: 10 rows are older.
    assert window.left_out["older than the window of 30 rows"] == 10
    # Unread: .3 whole and the 16 oldest lines of .2.
    lines_2 = (tmp_path / "inference.jsonl.2").read_text().splitlines()
    assert window.not_read == {"files": 1, "bytes": (tmp_path / "inference.jsonl.3").stat().st_size
                               + sum(len(line) + 1 for line in lines_2[:16])}
