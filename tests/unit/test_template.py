"""template.yaml: valid, safe by default, and in step with the code it deploys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from modelfn.runtime.http import openapi_document
from tests.conftest import ROOT
from tests.template import resources, template


def test_template_passes_cfn_lint() -> None:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")  # the venv's, not the machine's
    out = subprocess.run([str(cfn_lint), str(ROOT / "template.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_template_targets_python312_and_x86() -> None:
    fn = template()["Globals"]["Function"]
    assert fn["Runtime"] == "python3.12" and fn["Architectures"] == ["x86_64"]
    for layer in resources("AWS::Serverless::LayerVersion").values():
        assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]


def test_template_routes_match_the_openapi_document() -> None:
    events = resources("AWS::Serverless::Function")["ApiFunction"]["Properties"]["Events"]
    routes = {(e["Properties"]["Method"].lower(), e["Properties"]["Path"])
              for e in events.values() if e["Type"] == "HttpApi"}
    documented = {(method, path) for path, item in openapi_document()["paths"].items()
                  for method in item}
    assert routes == documented


def test_model_bucket_is_encrypted_private_and_tls_only() -> None:
    bucket = template()["Resources"]["ModelBucket"]["Properties"]
    sse = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert sse["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    (policy,) = resources("AWS::S3::BucketPolicy").values()
    deny = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Deny"]
    assert any(s["Condition"]["Bool"]["aws:SecureTransport"] is False for s in deny)


def test_api_function_can_only_read_models() -> None:
    props = resources("AWS::Serverless::Function")["ApiFunction"]["Properties"]
    statements = [s for p in props["Policies"] for s in p["Statement"]]
    actions = sorted(a for s in statements for a in
                     ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    assert actions == ["s3:GetObject", "s3:ListBucket"]
    for s in statements:
        assert s["Effect"] == "Allow"
        assert "*" not in json.dumps(s["Action"])
        resource = json.dumps(s["Resource"])
        assert resource != '"*"'
        if s["Action"] == "s3:GetObject":
            assert "/models/*" in resource
        else:
            assert s["Condition"]["StringLike"]["s3:prefix"] == ["models", "models/*"]


def test_every_function_has_a_log_group_with_retention() -> None:
    groups = resources("AWS::Logs::LogGroup")
    named = {json.dumps(g["Properties"].get("LogGroupName")) for g in groups.values()}
    for name in resources("AWS::Serverless::Function"):
        assert any(name in n for n in named), f"{name} has no log group"
    assert all("RetentionInDays" in g["Properties"] for g in groups.values())


def test_every_route_requires_iam_auth() -> None:
    auth = template()["Resources"]["HttpApi"]["Properties"]["Auth"]
    assert auth == {"EnableIamAuthorizer": True, "DefaultAuthorizer": "AWS_IAM"}
    for fn in resources("AWS::Serverless::Function").values():
        for event in fn["Properties"].get("Events", {}).values():
            if event["Type"] == "HttpApi":  # no route opts out of the default authorizer
                assert "Auth" not in event["Properties"], event


def allow_statements(node: Any) -> list[dict[str, Any]]:
    """Every Allow statement anywhere in the template (function policies, roles,
    bucket and queue policies)."""
    found = []
    if isinstance(node, dict):
        if node.get("Effect") == "Allow" and "Action" in node:
            found.append(node)
        for value in node.values():
            found += allow_statements(value)
    elif isinstance(node, list):
        for value in node:
            found += allow_statements(value)
    return found


def test_no_allow_statement_has_a_wildcard_action_or_resource() -> None:
    statements = allow_statements(template()["Resources"])
    assert len(statements) >= 8
    for s in statements:
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        assert not any("*" in a for a in actions), s
        res = s.get("Resource", [])
        for r in res if isinstance(res, list) else [res]:
            text = r.get("Fn::Sub", "") if isinstance(r, dict) else r
            # a key prefix such as "${ModelBucket.Arn}/models/*" is scoped; "*" alone or
            # a wildcard in a service, region, account or bucket part is not
            assert isinstance(text, str) and r != "*", s
            assert "*" not in text or (text.count("*") == 1 and text.endswith("/*")
                                       and text.startswith("${")), s


def test_api_stage_is_throttled() -> None:
    (api,) = resources("AWS::Serverless::HttpApi").values()
    settings = api["Properties"]["DefaultRouteSettings"]
    assert {"ThrottlingRateLimit", "ThrottlingBurstLimit"} <= set(settings)


def test_every_makefile_build_has_its_target() -> None:
    built = {**resources("AWS::Serverless::Function"),
             **resources("AWS::Serverless::LayerVersion")}
    for name, res in built.items():
        assert res["Metadata"]["BuildMethod"] == "makefile"
        folder = res["Properties"].get("CodeUri") or res["Properties"]["ContentUri"]
        makefile = (ROOT / folder / "Makefile").read_text()
        assert re.search(rf"^build-{name}:", makefile, re.M), f"{folder}/Makefile: {name}"


def test_every_sample_event_matches_a_template_route() -> None:
    events = resources("AWS::Serverless::Function")["ApiFunction"]["Properties"]["Events"]
    route_keys = {f"{e['Properties']['Method']} {e['Properties']['Path']}"
                  for e in events.values()}
    for path in sorted((ROOT / "events").glob("api-*.json")):
        assert json.loads(path.read_text())["routeKey"] in route_keys, path.name


# --- batch inference ------------------------------------------------------------------

def _param_default(name: str) -> Any:
    return template()["Parameters"][name]["Default"]


def _statements(function: str) -> list[dict[str, Any]]:
    props = template()["Resources"][function]["Properties"]
    return [s for policy in props["Policies"] for s in policy["Statement"]]


def test_uploads_under_inputs_notify_the_batch_queue_only() -> None:
    bucket = template()["Resources"]["ModelBucket"]
    (config,) = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    assert config["Event"] == "s3:ObjectCreated:*"
    assert config["Queue"] == {"Fn::GetAtt": ["BatchQueue", "Arn"]}
    rules = {r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "inputs/", "suffix": ".jsonl"}
    assert not "outputs/".startswith(rules["prefix"])  # outputs can never re-trigger
    assert bucket["DependsOn"] == "BatchQueuePolicy"
    (stmt,) = template()["Resources"]["BatchQueuePolicy"]["Properties"]["PolicyDocument"][
        "Statement"]
    assert stmt["Principal"] == {"Service": "s3.amazonaws.com"}
    assert stmt["Action"] == "sqs:SendMessage"
    assert stmt["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}


def test_batch_queue_has_dead_letters_and_a_long_enough_visibility_timeout() -> None:
    queue = template()["Resources"]["BatchQueue"]["Properties"]
    assert queue["RedrivePolicy"]["maxReceiveCount"] >= 5
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["BatchDeadLetterQueue", "Arn"]}
    timeout = _param_default("BatchTimeout")
    visibility = int(queue["VisibilityTimeout"]["Fn::Sub"].replace(
        "${BatchTimeout}", str(timeout)))
    assert visibility >= 6 * timeout
    for bound in (template()["Parameters"]["BatchTimeout"]["MaxValue"],
                  template()["Parameters"]["BatchTimeout"]["MinValue"]):
        assert int(f"{bound}0") >= 6 * bound and int(f"{bound}0") <= 43_200  # SQS maximum
    function = template()["Resources"]["BatchFunction"]["Properties"]
    assert function["Timeout"] == {"Ref": "BatchTimeout"}
    event = function["Events"]["Uploads"]
    assert event["Type"] == "SQS" and event["Properties"]["Queue"] == {
        "Fn::GetAtt": ["BatchQueue", "Arn"]}
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_batch_function_reads_inputs_writes_outputs_reads_models_only() -> None:
    by_sid = {s["Sid"]: s for s in _statements("BatchFunction")}
    assert set(by_sid) == {"ReadInputs", "WriteOutputs", "ReadModels", "ListModels",
                           "Idempotency"}
    assert by_sid["ReadInputs"]["Action"] == "s3:GetObject"
    assert by_sid["ReadInputs"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/inputs/*"}
    assert by_sid["WriteOutputs"]["Action"] == ["s3:PutObject", "s3:AbortMultipartUpload"]
    assert by_sid["WriteOutputs"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/outputs/*"}
    assert by_sid["ReadModels"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/models/*"}
    assert by_sid["Idempotency"]["Resource"] == {"Fn::GetAtt": ["IdempotencyTable", "Arn"]}
    for stmt in by_sid.values():
        actions = stmt["Action"] if isinstance(stmt["Action"], list) else [stmt["Action"]]
        assert all("*" not in a for a in actions) and stmt["Resource"] != "*"


def test_idempotency_table_is_on_demand_with_ttl() -> None:
    table = template()["Resources"]["IdempotencyTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    env = template()["Resources"]["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MODELFN_IDEMPOTENCY_TABLE"] == {"Ref": "IdempotencyTable"}
