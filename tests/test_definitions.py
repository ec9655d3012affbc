"""The code location loads, every asset is described and versioned, and the library stays Dagster-free."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]

EXPECTED_ASSETS = {
    "reports", "invalid_reports", "report_entities_rules", "report_entities_radgraph", "report_entities_llm",
    "entity_vocabulary", "report_labels", "extractor_agreement", "knowledge_concepts", "knowledge_definitions",
    "knowledge_triplets", "knowledge_encoder", "knowledge_encoder_eval", "image_manifest", "image_annotations",
    "image_cache", "training_pairs", "kad_model", "zero_shot_scores", "evaluation_metrics", "grounding_scores",
    "evaluation_report",
}


def test_every_asset_has_code_version_group_and_description():
    from kad_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.materializable_asset_keys}
    assert EXPECTED_ASSETS <= keys, f"missing assets: {sorted(EXPECTED_ASSETS - keys)}"
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert node.code_version, f"{key.to_user_string()} has no code_version"
        assert node.group_name != "default", f"{key.to_user_string()} has no group"
        assert node.description, f"{key.to_user_string()} has no description"


def test_dagster_definitions_validate_cli(tmp_path):
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), KAD_ARTIFACTS_URI=str(tmp_path / "artifacts"))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = Path(sys.executable).parent / "dagster"
    for args in (["-m", "kad_pipeline.definitions"], ["-w", str(REPO / "workspace.yaml")]):
        completed = subprocess.run(
            [str(dagster), "definitions", "validate", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr


def test_library_does_not_import_dagster():
    allowed = {"kad_pipeline/definitions.py"}
    offenders = []
    for path in sorted((REPO / "kad_pipeline").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "dagster" or name.startswith(("dagster.", "dagster_aws", "dagster_k8s")) for name in names):
                offenders.append(relative)
    assert offenders == [], f"library modules import Dagster: {offenders}"
