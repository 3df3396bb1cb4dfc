"""The dental studio in a real browser: ``ctrlora-ops studio`` runs as a server on a free local
port over a real sqlite MLflow registry (two versions of a lighting adapter, one canny adapter,
real tiny models on real rendered + prepared scans); headless Chromium (Debian's package, driven
by Playwright through its executable) loads the page, composes two conditions from an upload and
a validation scan, generates, compares champion and challenger, promotes with confirmation, and is
refused a bad upload; it lists the registered combination ``ctrlora+canny+lighting`` (source
versions, weights, recipe) and generates from it on a validation scan's maps the image
``ctrlora-ops generate --combination`` draws. Plus the upload rules on their own."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mlflow")

from _models_helpers import save_tiny_models  # noqa: E402
from _project_helpers import post_json  # noqa: E402

SIZE = 32
REPO = Path(__file__).resolve().parents[2]
SHOTS_ENV = "CTRLORA_STUDIO_SCREENSHOTS"   # a folder: the browser test saves its screenshots there
COMBINATION = "ctrlora+canny+lighting"


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def test_upload_rules():
    from pipelines.studio.app import StudioError, decode_upload

    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out = decode_upload(_data_url(_png(img)), "map.png")
    assert out.shape == (40, 40, 3) and np.array_equal(out, img)
    gray = decode_upload(_data_url(_png(img[..., 0])), "gray.png")   # L → RGB
    assert gray.shape == (40, 40, 3)
    cases = [(_data_url(b"GIF89a....", "image/gif"), "anim.gif", "not a PNG or JPEG"),
             (_data_url(_png(img[:, :20])), "wide.png", "not square"),
             (_data_url(_png(img[:8, :8])), "tiny.png", "each side must lie in 16"),
             (_data_url(b"\x89PNG\r\n\x1a\nbroken"), "cut.png", "cannot be decoded"),
             ("data:image/png;base64,@@@", "junk.png", "not valid base64"),
             (None, "none.png", "empty upload")]
    for data, name, rule in cases:
        with pytest.raises(StudioError, match=rule) as err:
            decode_upload(data, name)
        assert str(err.value).startswith(name)


# ----------------------------------------------------------------------------- project + registry

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """data/rendered + data/prepared (lighting, canny; 32 px), models/{backbone, base}, the
    adapters lighting-1, lighting-2, canny-1 on that base, a lighting re-detector and the
    project's frozen benchmark v1 (its validation scans) that promotions are decided on."""
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare
    from ctrlora.data.render import DatasetConfig, render_dataset

    root = tmp_path_factory.mktemp("studio") / "project"
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=12, seed=4, resolution=SIZE, workers=1, progress=False))
    prepare(PrepareConfig(sources=(data / "rendered",), out=data / "prepared", data_root=data,
                          test_fraction=0.5, validation_fraction=0.1, conditions=("lighting", "canny"),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))
    save_tiny_models(root, SIZE, [(cond, k, k + 10 * len(cond))
                                  for cond, k in (("lighting", 1), ("lighting", 2), ("canny", 1))])
    from ctrlora.evaluation.detectors import save_detector, train_detector
    from ctrlora.evaluation.fidelity import default_detector_config
    from ctrlora.evaluation.loading import detector_targets, load_split
    from pipelines.registry import frozen_benchmark

    train = load_split(data / "prepared", "train", ["lighting"], progress=False)
    save_detector(train_detector(default_detector_config("lighting", width=4, epochs=1), train.photos,
                                 detector_targets("lighting", train), progress=False),
                  root / "foundation/detectors/lighting")
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"train_base": {"conditions": []}, "train_adapter": {"conditions": ["lighting"]},
         "register": {"gate": {"rule": "superiority", "min_delta": 0.0},
                      "benchmark": {"max_scans": 3, "grid_rows": 2, "bootstrap": {"n_boot": 200, "seed": 0},
                                    "sampling": {"steps": 2, "scheduler": "dpm_karras", "guidance_scale": 1.0,
                                                 "batch_size": 8, "seed": 5}}},
         "evaluate": {"condition_weights": {"lighting": 2.0}, "gate_guidance": 1.0,
                      "sampling": {"scheduler": "dpm_karras", "steps": 4}}}))
    frozen_benchmark.freeze(root, log=lambda m: None)
    return root


@pytest.fixture(scope="module")
def registry(project, tmp_path_factory):
    """A sqlite store: ctrlora-lighting v1 (champion), v2 (challenger: registered without a
    comparison, so promoting it runs the paired comparison on the benchmark), ctrlora-canny v1 and
    the combination ctrlora+canny+lighting v1 of the two champions (recipe from the project's
    params: dpm_karras, 4 steps, guidance 1; weights canny 1, lighting 2)."""
    from pipelines.registry.combination import combine
    from pipelines.registry.registration import register_adapter

    store = tmp_path_factory.mktemp("mlflow-studio")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "test-studio", "CTRLORA_PARTS_CACHE": str(store / "parts")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        models = project / "models"
        for cond, k, fid in (("lighting", 1, 0.5), ("lighting", 2, 0.6), ("canny", 1, 0.7)):
            res = register_adapter(cond, models / "adapters" / f"{cond}-{k}", dataset_hash=f"{k}" * 32 + ".dir",
                                   base_hash="b" * 64, backbone_dir=models / "backbone", base_dir=models / "base",
                                   metrics={"fidelity": fid}, git_commit="c0ffee", gate={"min_delta": 0.0})
            assert res.decision == ("challenger" if k == 2 else "champion")
        built = combine(["lighting", "canny"], root=project)
        assert (built.model_name, built.version, built.created) == (COMBINATION, "1", True)
        yield env


@pytest.fixture(scope="module")
def server(project, registry, tmp_path_factory):
    """``ctrlora-ops studio`` on a free port (the command prints the address it bound)."""
    log = tmp_path_factory.mktemp("studio-log") / "server.err"
    cmd = [sys.executable, "-m", "pipelines.cli", "studio", "--port", "0", "--threads", "1",
           "--repo", str(project), "--prepared", str(project / "data/prepared"),
           "--detectors", str(project / "foundation/detectors")]
    env = {**os.environ, **registry, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        started = time.monotonic()
        line = proc.stdout.readline()
        assert "serving on http://127.0.0.1:" in line, f"studio did not start: {line!r}\n{log.read_text()}"
        url = line.split("serving on ", 1)[1].strip()
        yield {"url": url, "start_s": time.monotonic() - started, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_api_refuses_bad_requests_and_derives_maps(server, project):
    url = server["url"]
    status, out = post_json(url + "api/generate", {"conditions": [{"condition": "depth", "source": "upload"}]})
    assert status == 400 and "condition 'depth', which has no adapter" in out["error"]
    status, out = post_json(url + "api/generate", {"conditions": [{"condition": "lighting", "source": "scan",
                                                               "weight": 4}], "scan": None})
    assert status == 400 and out["error"] == "weight 4.0 is out of range [0, 3]"
    status, out = post_json(url + "api/promote", {"condition": "lighting", "version": "2"})
    assert status == 400 and "confirmation" in out["error"]
    # each condition's weight starts where the evaluation measured it (params evaluate.condition_weights)
    with urllib.request.urlopen(url + "api/state", timeout=60) as r:
        state = json.loads(r.read())
    assert state["default_weights"] == {"lighting": 2.0} and state["limits"]["weight"] == [0.0, 3.0]
    # the page starts with the evaluation's sampler, the recipe registered versions record
    assert state["default_sampling"] == {"sampler": "dpm_karras", "steps": 4, "guidance": 1.0}
    # the scans offered are the promotion split's (validation), never the report's test split
    splits = json.loads((project / "data/prepared/meta/splits.json").read_text())
    offered = {s["id"] for s in state["scans"]}
    assert offered and offered <= set(splits["validation"]) and not offered & set(splits["test"])
    photo = next((project / "data/prepared/photos").glob("*.png"))
    status, up = post_json(url + "api/upload", {"filename": photo.name, "data": _data_url(photo.read_bytes())})
    assert status == 200 and up["width"] == SIZE
    status, out = post_json(url + "api/derive", {"condition": "canny", "photo": up["token"]})
    assert status == 200 and out["image"].startswith("data:image/png;base64,")
    status, out = post_json(url + "api/derive", {"condition": "lighting", "photo": up["token"]})
    assert status == 400 and "cannot be derived" in out["error"]
    # a generation whose canny map is derived from the photograph, polled to its end
    status, job = post_json(url + "api/generate", {"conditions": [{"condition": "canny", "source": "derive",
                                                               "map": up["token"]}],
                                               "steps": 2, "num_images": 1, "sampler": "dpm"})
    assert status == 200 and job["state"] in ("queued", "running")
    deadline = time.monotonic() + 300
    while job["state"] not in ("done", "error") and time.monotonic() < deadline:
        time.sleep(0.5)
        with urllib.request.urlopen(url + f"api/jobs/{job['id']}", timeout=30) as r:
            job = json.loads(r.read())
    assert job["state"] == "done", job["error"]
    (run,) = job["result"]["runs"]
    assert len(run["images"]) == 1 and run["images"][0]["scores"] == {}   # no ground truth: no scores
    assert job["result"]["maps"][0]["condition"] == "canny" and job["result"]["truth"] is None


# ----------------------------------------------------------------------------- the browser

def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed here and could not be installed "
                    "(scripts/bootstrap.sh installs it with apt-get when run as root)")
    return exe


def _shot(page, name: str) -> None:
    folder = os.environ.get(SHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"studio_{name}.png"), full_page=True)


def test_studio_in_a_real_browser(server, project, registry):
    from mlflow import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    exe = _chromium()
    url = server["url"]
    lighting_map = next((project / "data/prepared/conditions/lighting").glob("*.png"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)   # a generation loads models first
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            # the registry's versions, aliases, dataset hash; inspect the challenger
            rows = page.locator("#model-rows tr")
            expect(rows).to_have_count(3)
            v2 = page.locator("tr[data-ref='models:/ctrlora-lighting/2']")
            expect(v2).to_contain_text("challenger")
            expect(page.locator("tr[data-ref='models:/ctrlora-lighting/1']")).to_contain_text("champion")
            v2.locator("button.inspect").click()
            expect(page.locator("#inspect-table")).to_contain_text("2" * 32 + ".dir")
            expect(page.locator("#adapter-table")).to_contain_text("adapter rank2")   # its own config
            _shot(page, "inspect")

            # two conditions: lighting from an uploaded map, canny from a validation scan (ground truth)
            page.check("#use-lighting")
            page.check("#use-canny")
            page.set_input_files("#file-lighting", str(lighting_map))
            expect(page.locator("#preview-lighting")).to_have_attribute("src", re.compile("^data:image/png"))
            scan = page.locator("#scan option").nth(1).get_attribute("value")
            page.select_option("#scan", scan)
            expect(page.locator("#source-canny")).to_have_value("scan")
            expect(page.locator("#source-lighting")).to_have_value("upload")
            page.fill("#weight-lighting", "0.8")
            page.fill("#steps", "3")
            page.fill("#num-images", "2")
            page.click("#generate")
            gen = page.locator("#runs img.generated")
            expect(gen).to_have_count(2)
            expect(page.locator("#status")).to_contain_text("step 3 / 3")
            expect(page.locator("#maps img.map")).to_have_count(2)
            expect(page.locator("#truth img.truth")).to_have_count(1)
            expect(page.locator("#runs .scores").first).to_contain_text("canny.edge_f1")
            for i in range(2):
                assert gen.nth(i).get_attribute("src").startswith("data:image/png;base64,")
                assert gen.nth(i).evaluate("im => im.naturalWidth") == SIZE
            _shot(page, "generate")

            # champion vs challenger on the same maps and seeds, side by side, then promote
            page.select_option("#compare-condition", "lighting")
            page.select_option("#compare-a", "models:/ctrlora-lighting/1")
            page.select_option("#compare-b", "models:/ctrlora-lighting/2")
            page.click("#compare")
            runs = page.locator("#runs .run")
            expect(runs).to_have_count(2)
            expect(runs.nth(0)).to_contain_text("v1 (champion)")
            expect(runs.nth(1)).to_contain_text("v2 (challenger)")
            expect(page.locator("#runs img.generated")).to_have_count(4)
            a, b = (runs.nth(i).locator("img.generated").first.get_attribute("src") for i in range(2))
            assert a != b  # two different adapters drew on the same seed
            _shot(page, "compare")
            runs.nth(1).locator("button.promote").click()
            dialog = page.locator("#confirm")
            expect(dialog).to_be_visible()
            expect(page.locator("#gate-report")).to_contain_text("challenger")
            expect(page.locator("#gate-report")).to_contain_text("runs now")  # no stored means decide
            # v2 has no recipe: it is served, so compared, at residual weight 1
            expect(page.locator("#gate-report")).to_contain_text("1 (the version's recipe weight, both sides)")
            _shot(page, "promote")
            page.click("#confirm-promote")
            expect(page.locator("#promote-result")).to_contain_text("ctrlora-lighting v2", timeout=120_000)
            expect(page.locator("#promote-result")).to_contain_text("benchmark v1")

            # a bad upload: the page says which file and which rule, nothing is generated
            page.set_input_files("#file-canny", files=[{"name": "notes.png", "mimeType": "image/png",
                                                        "buffer": b"these are notes, not a map"}])
            expect(page.locator("#error")).to_be_visible()
            expect(page.locator("#error")).to_contain_text("notes.png: not a PNG or JPEG image")
        finally:
            browser.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry["MLFLOW_TRACKING_URI"])
        # the paired comparison ran on the benchmark's validation scans and decided, as recorded
        tags = MlflowClient().get_model_version("ctrlora-lighting", "2").tags
        champion = str(MlflowClient().get_model_version_by_alias("ctrlora-lighting", "champion").version)
        assert tags["gate_champion_version"] == "1" and tags["benchmark_version"] == "1"
        assert (champion == "2") == (float(tags["gate_low"]) > 0.0)
    assert "Traceback" not in server["log"].read_text()


def test_a_combination_in_the_studio(server, project, registry, tmp_path):
    """The registered combination is listed with its source versions, weights and recipe; the
    page generates from it on a validation scan's maps at its recipe and weights, and the image is
    the one ``ctrlora-ops generate --combination`` draws from the same maps, prompt and seed; an
    edited weight draws another image; a missing scan and a bad weight are refused."""
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from pipelines import cli

    exe = _chromium()
    url = server["url"]
    ref = f"models:/{COMBINATION}/1"
    with urllib.request.urlopen(url + "api/state", timeout=60) as r:
        state = json.loads(r.read())
    (combo,) = state["combinations"]
    assert combo["ref"] == ref and combo["aliases"] == ["champion"]
    assert combo["sources"] == {"canny": "models:/ctrlora-canny/1", "lighting": "models:/ctrlora-lighting/1"}
    assert combo["weights"] == {"canny": 1.0, "lighting": 2.0}
    assert combo["recipe"] == {"scheduler": "dpm_karras", "steps": 4, "guidance_scale": 1.0}
    assert all(a["model"] != COMBINATION for a in state["adapters"])   # not among the adapters
    scan = state["scans"][0]["id"]
    for body, error in (({"combination": ref, "scan": scan, "weights": {"lighting": 4}},
                         "lighting: weight 4.0 is out of range [0, 3]"),
                        ({"combination": ref, "scan": scan, "weights": {"depth": 1}},
                         "'depth' is not a condition of ctrlora+canny+lighting"),
                        ({"combination": "models:/ctrlora+canny+depth/1", "scan": scan},
                         "is not on offer")):
        status, out = post_json(url + "api/generate", body)
        assert status == 400 and error in out["error"], out

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            expect(page.locator("#model-rows tr")).to_have_count(3)   # the adapters' table as before
            row = page.locator(f"#combo-rows tr[data-ref='{ref}']")
            expect(row).to_contain_text("champion")
            expect(row.locator("td.sources")).to_have_text("canny v1, lighting v1")
            expect(row.locator("td.weights")).to_have_text("canny × 1, lighting × 2")
            expect(row).to_contain_text("dpm_karras, 4 steps, guidance 1")
            row.locator("button.use-combination").click()
            expect(page.locator("#combination")).to_have_value(ref)
            expect(page.locator("#combo-weight-lighting")).to_have_value("2")
            expect(page.locator("#combo-weight-canny")).to_have_value("1")
            expect(page.locator("#combo-recipe")).to_be_checked()
            page.click("#combo-generate")   # no scan picked yet: refused, saying why
            expect(page.locator("#error")).to_contain_text("pick a validation scan")

            page.select_option("#scan", scan)
            page.fill("#seed", "3")
            page.fill("#num-images", "1")
            page.fill("#steps", "2")        # the Sampling section's steps: unused at the recipe
            page.click("#combo-generate")
            expect(page.locator("#runs img.generated")).to_have_count(1)
            expect(page.locator("#status")).to_contain_text("step 4 / 4")
            expect(page.locator("#results-title")).to_contain_text(
                f"{COMBINATION} v1 (champion): dpm_karras, 4 steps, guidance 1 (its recipe)")
            expect(page.locator("#maps img.map")).to_have_count(2)
            expect(page.locator("#maps")).to_contain_text("lighting × 2")
            expect(page.locator("#truth img.truth")).to_have_count(1)
            expect(page.locator("#runs .run button.promote")).to_have_count(0)
            drawn = page.locator("#runs img.generated").first.get_attribute("src")
            prompt = page.input_value("#prompt")
            _shot(page, "combination")

            page.fill("#combo-weight-lighting", "0.5")
            page.click("#combo-generate")
            expect(page.locator("#maps")).to_contain_text("lighting × 0.5")
            expect(page.locator("#runs img.generated")).to_have_count(1)
            reweighted = page.locator("#runs img.generated").first.get_attribute("src")
            assert reweighted != drawn   # the edited weight is drawn with
        finally:
            browser.close()

    # the CLI on the same maps (the scan's files), prompt and seed draws the same pixels
    maps = project / "data/prepared/conditions"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in registry.items():
            mp.setenv(k, v)
        assert cli.main(["generate", "--combination", f"models:/{COMBINATION}@champion",
                         "--condition", f"lighting={maps / 'lighting' / f'{scan}.png'}",
                         "--condition", f"canny={maps / 'canny' / f'{scan}.png'}",
                         "--prompt", prompt, "--seed", "3", "--out", str(tmp_path / "gen")]) == 0
    (cli_png,) = sorted((tmp_path / "gen").glob("*.png"))
    studio_png = base64.b64decode(drawn.split(",", 1)[1])
    with Image.open(cli_png) as a, Image.open(io.BytesIO(studio_png)) as b:
        assert a.size == b.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert "Traceback" not in server["log"].read_text()
