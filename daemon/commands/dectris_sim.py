"""`cryoptycho dectris-sim`: stream a dataset (or synthetic frames) as a DECTRIS detector would.

It binds PUSH like a detector control unit (Stream V2 CBOR or V1 JSON + binary), so the bridge
(`cryoptycho serve --source dectris2://HOST:PORT`), DECTRIS' reference client or LiberTEM can
connect to it. The scan geometry travels as a cryoptycho scan description in the series'
``user_data`` (SIMPLON ``header_appendix``) unless ``--no-user-data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from cryoptycho.daemon.storage.dataset import read_dataset
from cryoptycho.gpu.geometry import wavelength
from cryoptycho.protocols.dectris.receiver import DEFAULT_PORTS
from cryoptycho.protocols.dectris.scan import USER_DATA_KEY, ScanDescription
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries


def dataset_series(path: Path, with_user_data: bool = True) -> SimSeries:
    """A dataset file as one detector series: frames as the detector image (beam centre at
    pixel M//2), positions and geometry in ``user_data``."""
    data = read_dataset(path)
    frames = _counts(data.frames)
    m = data.frame_shape[0]
    angle = data.detector_pixel_angle
    if angle is None:
        assert data.pixel_size is not None
        angle = wavelength(data.energy) / (m * data.pixel_size)
    user: dict[str, Any] | None = None
    if with_user_data:
        desc: dict[str, Any] = {
            "scan": {"kind": "positions", "positions_m": np.asarray(data.positions, float).tolist()},
            "scan_id": path.stem[:128],
            "energy_eV": float(data.energy),
            "detector_pixel_angle_rad": float(angle),
            "metadata": {"replayed_from": str(path)},
        }
        if data.probe_model is not None:
            pm = data.probe_model
            desc["probe_model"] = {"kind": pm.kind, "semiangle_rad": pm.semiangle, "defocus_m": pm.defocus,
                                   "cs_m": pm.cs, "zones": pm.zones, "diameter_m": pm.diameter, "seed": pm.seed,
                                   "source_size_m": pm.source_size}
        user = {USER_DATA_KEY: ScanDescription.model_validate(desc).model_dump(mode="json", exclude_none=True)}
    mask = None if data.mask is None else (~np.asarray(data.mask, bool)).astype(np.uint32)
    return SimSeries(frames, energy_ev=data.energy, pixel_mask=mask, user_data=user)


def _counts(frames: np.ndarray) -> np.ndarray:
    if frames.dtype.kind == "f" and not np.array_equal(frames, np.round(frames)):
        raise ValueError("dataset frames are not integer counts; a detector sends integers")
    top = int(frames.max()) if frames.size else 0
    for dt in (np.uint8, np.uint16, np.uint32):
        if top < np.iinfo(dt).max:  # the maximum is the detector's no-data flag
            return frames.astype(dt)
    raise ValueError(f"counts up to {top} do not fit a uint32 detector image")


def synthetic_series(count: int, size: int, dose: float, seed: int, with_user_data: bool = True) -> SimSeries:
    """Poisson counts of a bright-field disc on a square raster of ``count`` positions."""
    side = int(np.ceil(np.sqrt(count)))
    rng = np.random.default_rng(seed)
    y, x = np.indices((size, size)) - size // 2
    disc = (np.hypot(y, x) < size / 6).astype(float)
    frames = rng.poisson(dose * disc / disc.sum(), (count, size, size)).astype(np.uint16)
    user = None
    if with_user_data:
        scan = {"kind": "raster", "shape": [side, side], "step_m": [2e-10, 2e-10]}
        if side * side != count:
            raise ValueError(f"synthetic frames fill a square raster: use a square count, not {count}")
        user = {USER_DATA_KEY: {"scan": scan, "detector_pixel_angle_rad": 1e-3}}
    return SimSeries(frames, user_data=user)


@click.command()
@click.option("--version", "stream_version", type=click.Choice(["2", "1"]), default="2", show_default=True,
              help="SIMPLON Stream version: 2 = CBOR, 1 = JSON + binary multipart.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Cryoptycho dataset file to stream (default: synthetic frames).")
@click.option("--frames", "count", type=int, default=64, show_default=True, help="Synthetic: frames (a square).")
@click.option("--size", type=int, default=64, show_default=True, help="Synthetic: detector side, pixels.")
@click.option("--dose", type=float, default=200.0, show_default=True, help="Synthetic: electrons per frame.")
@click.option("--port", type=int, default=None,
              help="Port to bind (0 = a free one, printed). Default: 31001 for V2, 9999 for V1.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--compression", type=click.Choice(["bslz4", "lz4", "none"]), default="bslz4", show_default=True)
@click.option("--header-detail", type=click.Choice(["all", "basic", "none"]), default="basic", show_default=True,
              help="V1: parts of the global header.")
@click.option("--split-header", is_flag=True, help="V1: send the header parts as separate messages.")
@click.option("--user-data/--no-user-data", default=True, show_default=True,
              help="Put the scan description into the start message's user_data.")
@click.option("--series", "repeat", type=int, default=1, show_default=True, help="Series to send.")
@click.option("--series-id", type=int, default=1, show_default=True, help="Id of the first series.")
@click.option("--rate", type=float, default=0.0, show_default=True, help="Images per second; 0 = unpaced.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--print-schema", is_flag=True, help="Print the JSON schema of user_data['cryoptycho'] and exit.")
def command(
    stream_version: str, dataset: Path | None, count: int, size: int, dose: float, port: int | None,
    host: str, compression: str, header_detail: str, split_header: bool, user_data: bool,
    repeat: int, series_id: int, rate: float, seed: int, print_schema: bool,
) -> None:
    """Send a scan in DECTRIS SIMPLON Stream format, as a detector control unit would."""
    if print_schema:
        click.echo(json.dumps(ScanDescription.model_json_schema(), indent=2))
        return
    version = int(stream_version)
    try:
        base = dataset_series(dataset, user_data) if dataset else synthetic_series(count, size, dose, seed, user_data)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    base.compression, base.header_detail = compression, header_detail
    with SimSender(version, DEFAULT_PORTS[version] if port is None else port, host) as sender:
        click.echo(f"DECTRIS Stream V{version} sender on {sender.endpoint} "
                   f"(source URL dectris{version}://{host}:{sender.port})")
        for i in range(repeat):
            base.series_id = series_id + i
            base.series_unique_id = f"01CRYOPTYCHOSIM{base.series_id:011d}"
            sent = sender.send_series(base, split_header=split_header, rate=rate)
            click.echo(f"series {base.series_id}: {sent} messages sent ({len(base.ids())} images)", err=True)
        # the socket queues up to its SNDHWM (100,000 messages) ahead of a slower receiver; with
        # close's 2 s linger the exit dropped the rest (150 series sent, a daemon got 12)
        click.echo("waiting for the receiver to take every queued message (Ctrl-C drops them)", err=True)
        sender.close(linger_s=None)
