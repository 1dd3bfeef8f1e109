"""template.yaml: valid, safe by default, and in step with the code it deploys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelfn.runtime.http import openapi_document
from tests.conftest import ROOT
from tests.template import resolved, resources, template


def test_template_passes_cfn_lint() -> None:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")  # the venv's, not the machine's
    out = subprocess.run([str(cfn_lint), str(ROOT / "template.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_iac_scanner_finds_nothing_and_every_skip_says_why() -> None:
    """checkov (its own environment, .venv-checkov, installed by ``make setup``): every
    finding is fixed, or skipped in the resource's Metadata (checkov's skip syntax) with
    a reason a reviewer can check."""
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "checkov is installed by `make setup` into .venv-checkov"
    out = subprocess.run([str(checkov), "-f", str(ROOT / "template.yaml"), "--framework",
                          "cloudformation", "-o", "json"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout)
    results, summary = report["results"], report["summary"]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= 40, summary
    assert summary["passed"] >= 50, summary  # it checked the template
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    skipped = results["skipped_checks"]
    assert skipped, "no skip: then this test should say there is none to explain"
    for check in skipped:
        comment = check["check_result"].get("suppress_comment", "")
        assert len(comment) >= 60, (check["check_id"], check["resource"], comment)
    # the findings the issue named are among the explained ones
    explained = {(c["check_id"], c["resource"].split(".")[-1]) for c in skipped}
    assert {("CKV_AWS_21", "AccessLogBucket"), ("CKV_AWS_116", "ImageApiFunction"),
            ("CKV_AWS_119", "BatchRunsTable"), ("CKV_AWS_119", "IdempotencyTable"),
            ("CKV_AWS_116", "BatchDeadLetterFunction")} <= explained


def test_template_targets_python312_on_the_chosen_architecture() -> None:
    # on demand python3.12; on Lambda Managed Instances (Managed*) python3.13, the oldest
    # they run, each on the layer built for it
    for name, fn in resources("AWS::Serverless::Function").items():
        if fn["Properties"].get("PackageType") != "Image":
            managed = name.startswith("Managed")
            assert fn["Properties"]["Runtime"] == ("python3.13" if managed else
                                                   "python3.12"), name
            layer = "RuntimeLayer313" if managed else "RuntimeLayer"
            assert layer in json.dumps(fn["Properties"]["Layers"]), name
    layers = resources("AWS::Serverless::LayerVersion")
    assert layers["RuntimeLayer"]["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layers["RuntimeLayer313"]["Properties"]["CompatibleRuntimes"] == ["python3.13"]
    assert template()["Parameters"]["Architecture"]["Default"] == "x86_64"
    for arch in ("x86_64", "arm64"):
        deployed = resolved(Architecture=arch)
        functions = [r for r in deployed.values() if r["Type"] == "AWS::Lambda::Function"]
        assert len(functions) == 3  # the API, the batch function and its dead letters'
        assert all(f["Properties"]["Architectures"] == [arch] for f in functions)
        (layer,) = [r for r in deployed.values() if r["Type"] == "AWS::Lambda::LayerVersion"]
        assert layer["Properties"]["CompatibleArchitectures"] == [arch]


def api_routes() -> dict[tuple[str, str], dict[str, Any]]:
    body = template()["Resources"]["HttpApi"]["Properties"]["DefinitionBody"]
    return {(method, path): op for path, item in body["paths"].items()
            for method, op in item.items()}


def test_template_routes_match_the_openapi_document() -> None:
    routes = set(api_routes())
    documented = {(method, path) for path, item in openapi_document()["paths"].items()
                  for method in item}
    assert routes == documented


KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
WITH_AND_WITHOUT_KEY = pytest.mark.parametrize("key", ["", KEY], ids=["aws-managed", "kms-key"])


def deployed_with(key: str, **parameters: str) -> dict[str, Any]:
    return resolved(**({"KmsKeyArn": key} if key else {}), **parameters)


def of_type(deployed: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r.get("Properties", {}) for name, r in deployed.items() if r["Type"] == kind}


@WITH_AND_WITHOUT_KEY
def test_model_bucket_is_encrypted_private_and_tls_only(key: str) -> None:
    deployed = deployed_with(key)
    bucket = deployed["ModelBucket"]["Properties"]
    sse = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert sse["ServerSideEncryptionByDefault"] == (
        {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KEY} if key else {"SSEAlgorithm": "AES256"})
    assert sse["BucketKeyEnabled"] is True
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    policy = deployed["ModelBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    deny = [s for s in policy if s["Effect"] == "Deny"]
    assert any(s["Condition"]["Bool"]["aws:SecureTransport"] is False for s in deny)


@WITH_AND_WITHOUT_KEY
@pytest.mark.parametrize("image", ["", "111122223333.dkr.ecr.us-east-1.amazonaws.com/m:1"])
def test_every_queue_table_log_group_and_function_environment_is_encrypted(
        key: str, image: str) -> None:
    deployed = deployed_with(key, **({"ApiImageUri": image} if image else {}))
    queues = of_type(deployed, "AWS::SQS::Queue")
    assert set(queues) == {"BatchQueue", "BatchDeadLetterQueue"}
    for queue in queues.values():
        if key:
            assert queue["KmsMasterKeyId"] == KEY and "SqsManagedSseEnabled" not in queue
            assert queue["KmsDataKeyReusePeriodSeconds"] == 300
        else:
            assert queue["SqsManagedSseEnabled"] is True and "KmsMasterKeyId" not in queue
    tables = of_type(deployed, "AWS::DynamoDB::Table")
    assert set(tables) == {"IdempotencyTable", "BatchRunsTable"}
    for table in tables.values():
        assert table["SSESpecification"] == (
            {"SSEEnabled": True, "SSEType": "KMS", "KMSMasterKeyId": KEY} if key
            else {"SSEEnabled": True})
    groups = of_type(deployed, "AWS::Logs::LogGroup")
    assert set(groups) == {"HttpApiAccessLogGroup", "ApiFunctionLogGroup",
                           "BatchFunctionLogGroup", "BatchDeadLetterFunctionLogGroup"}
    for group in groups.values():  # CloudWatch Logs encrypts them all; with the key, so
        assert group.get("KmsKeyId") == (key or None)
        assert group["RetentionInDays"] == "30"
    functions = of_type(deployed, "AWS::Lambda::Function")
    assert set(functions) == {"ImageApiFunction" if image else "ApiFunction", "BatchFunction",
                              "BatchDeadLetterFunction"}
    for function in functions.values():  # Lambda encrypts the environment; with the key, so
        assert function.get("KmsKeyArn") == (key or None)
    for name, bucket in of_type(deployed, "AWS::S3::Bucket").items():
        assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"], name


@pytest.mark.parametrize("image", ["", "111122223333.dkr.ecr.us-east-1.amazonaws.com/m:1"])
def test_the_kms_grant_appears_only_with_the_key_and_names_only_it(image: str) -> None:
    extra = {"ApiImageUri": image} if image else {}
    assert not [s for s in allow_statements(resolved(**extra)) if "kms:" in json.dumps(s)]
    deployed = resolved(KmsKeyArn=KEY, **extra)
    grants = [s for s in allow_statements(deployed) if "kms:" in json.dumps(s)]
    # one in each function's access policy (ApiAccessPolicy, BatchAccessPolicy), which
    # the functions' roles attach; nowhere else
    policies = of_type(deployed, "AWS::IAM::ManagedPolicy")
    assert set(policies) == {"ApiAccessPolicy", "BatchAccessPolicy"} and len(grants) == 2
    for name, policy in policies.items():
        (grant,) = [s for s in policy["PolicyDocument"]["Statement"]
                    if "kms:" in json.dumps(s)]
        assert grant["Action"] == ["kms:Decrypt", "kms:GenerateDataKey"]
        assert grant["Resource"] == KEY
        roles = [r for r in of_type(deployed, "AWS::IAM::Role").values()
                 if {"Ref": name} in r.get("ManagedPolicyArns", [])]
        # the batch policy: the batch function's role and its dead-letter consumer's
        assert len(roles) == (2 if name == "BatchAccessPolicy" else 1), name
        for role in roles:
            assert not [p for p in role.get("Policies", []) if "kms:" in json.dumps(p)]


def test_access_logs_go_to_a_private_tls_only_bucket_that_is_never_logged_itself() -> None:
    deployed = resolved(AccessLogRetentionDays="45", KmsKeyArn=KEY)
    logging = deployed["ModelBucket"]["Properties"]["LoggingConfiguration"]
    assert logging == {"DestinationBucketName": {"Ref": "AccessLogBucket"},
                       "LogFilePrefix": "model-bucket/"}
    logs = deployed["AccessLogBucket"]
    assert logs["DeletionPolicy"] == "Retain"
    props = logs["Properties"]
    assert "LoggingConfiguration" not in props  # never itself logged to
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True}
    # access logs can only be delivered to SSE-S3, with or without the key
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"] == [
        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
    (rule,) = props["LifecycleConfiguration"]["Rules"]
    assert rule["ExpirationInDays"] == "45" and rule["Status"] == "Enabled"
    statements = deployed["AccessLogBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements}
    assert by_sid["DenyInsecureTransport"]["Condition"] == {
        "Bool": {"aws:SecureTransport": False}}
    allow = by_sid["S3ServerAccessLogs"]
    assert allow["Principal"] == {"Service": "logging.s3.amazonaws.com"}
    assert allow["Action"] == "s3:PutObject"
    assert allow["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert set(by_sid) == {"S3ServerAccessLogs", "DenyInsecureTransport"}


def test_users_data_expires_after_the_configured_days() -> None:
    rules = {r["Id"]: r for r in resolved(
        InputRetentionDays="3", OutputRetentionDays="9", NoncurrentVersionDays="2",
        JobRetentionDays="4")["ModelBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]}
    expected = {"ExpireInputs": ("inputs/", "3"), "ExpireOutputs": ("outputs/", "9"),
                "ExpireJobs": ("async/", "4"), "ExpireUploads": ("uploads/", "4"),
                "ExpireBatchParts": ("batch-parts/", 5)}
    for rule_id, (prefix, days) in expected.items():
        rule = rules[rule_id]
        assert (rule["Prefix"], rule["ExpirationInDays"], rule["Status"]) == (
            prefix, days, "Enabled"), rule_id
        assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}, rule_id
    everything = rules["ExpireOldVersions"]
    assert "Prefix" not in everything and "Filter" not in everything  # the whole bucket
    assert everything["NoncurrentVersionExpiration"] == {"NoncurrentDays": "2"}
    assert everything["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert "ExpirationInDays" not in everything  # models/ stay
    assert [_param_default(p) for p in ("InputRetentionDays", "OutputRetentionDays",
                                        "NoncurrentVersionDays", "AccessLogRetentionDays")
            ] == [7, 30, 7, 90]


@pytest.mark.parametrize("image", ["", "111122223333.dkr.ecr.us-east-1.amazonaws.com/m:1"])
def test_each_function_has_a_concurrency_cap_and_the_api_keeps_its_throttling(
        image: str) -> None:
    extra = {"ApiImageUri": image} if image else {}
    api = "ImageApiFunction" if image else "ApiFunction"
    deployed = resolved(**extra)
    assert deployed[api]["Properties"]["ReservedConcurrentExecutions"] == "100"
    assert deployed["BatchFunction"]["Properties"]["ReservedConcurrentExecutions"] == "25"
    mappings = {json.dumps(m["EventSourceArn"]): m for m in of_type(
        deployed, "AWS::Lambda::EventSourceMapping").values()}
    mapping = mappings[json.dumps({"Fn::GetAtt": ["BatchQueue", "Arn"]})]
    assert int(mapping["ScalingConfig"]["MaximumConcurrency"]) == 20 <= 25
    # the dead letters' consumer: two at most, however many arrive at once
    dead = mappings[json.dumps({"Fn::GetAtt": ["BatchDeadLetterQueue", "Arn"]})]
    assert int(dead["ScalingConfig"]["MaximumConcurrency"]) == 2 and len(mappings) == 2
    (stage,) = of_type(deployed, "AWS::ApiGatewayV2::Stage").values()
    assert stage["DefaultRouteSettings"] == {"ThrottlingRateLimit": "100",
                                             "ThrottlingBurstLimit": "200"}
    capped = resolved(ApiReservedConcurrency="7", BatchReservedConcurrency="9", **extra)
    assert capped[api]["Properties"]["ReservedConcurrentExecutions"] == "7"
    assert capped["BatchFunction"]["Properties"]["ReservedConcurrentExecutions"] == "9"
    off = resolved(ApiReservedConcurrency="0", BatchReservedConcurrency="0", **extra)
    assert "ReservedConcurrentExecutions" not in off[api]["Properties"]  # 0 would stop it
    assert "ReservedConcurrentExecutions" not in off["BatchFunction"]["Properties"]


def test_what_is_left_out_on_purpose_says_why_beside_it() -> None:
    text = (ROOT / "template.yaml").read_text()

    def block(name: str) -> str:
        start = text.index(f"\n  {name}:\n")
        return text[max(0, text.rfind("\n\n", 0, start)):text.index("\n\n", start + 1)]

    assert "no point-in-time recovery:" in block("IdempotencyTable")
    assert "no point-in-time recovery:" in block("BatchRunsTable")
    assert "no dead-letter queue: API Gateway invokes it synchronously" in block("ApiFunction")
    assert "no function dead-letter queue" in block("BatchFunction")
    assert "No VPC:" in text[:text.index("\nParameters:")]  # in Globals: every function
    assert "cannot deliver access logs to a" in block("AccessLogBucket")


@pytest.mark.parametrize("function", ["ApiFunction", "ImageApiFunction"])
def test_api_function_reads_models_writes_job_requests_and_reads_job_results_only(
        function: str) -> None:
    by_sid = {s["Sid"]: s for s in _statements(function)}
    assert set(by_sid) == {"ReadModels", "ListModels", "WriteJobRequests", "ReadJobResults",
                           "SignUploads", "ListJobsAndUploads"}
    for s in by_sid.values():  # every listing is held to its prefixes
        assert s["Effect"] == "Allow" and (s["Action"] != "s3:ListBucket" or "Condition" in s)
    bucket = "${ModelBucket.Arn}"
    assert by_sid["ReadModels"] == {"Sid": "ReadModels", "Effect": "Allow",
                                    "Action": "s3:GetObject",
                                    "Resource": {"Fn::Sub": f"{bucket}/models/*"}}
    assert by_sid["ListModels"]["Condition"]["StringLike"]["s3:prefix"] == ["models",
                                                                           "models/*"]
    # it may write a job's request only: never its state or result, never a model
    assert by_sid["WriteJobRequests"]["Action"] == "s3:PutObject"
    assert by_sid["WriteJobRequests"]["Resource"] == {
        "Fn::Sub": f"{bucket}/async/*/request.json"}
    assert by_sid["ReadJobResults"]["Action"] == "s3:GetObject"
    assert by_sid["ReadJobResults"]["Resource"] == [
        {"Fn::Sub": f"{bucket}/async/*/status.json"},
        {"Fn::Sub": f"{bucket}/async/*/result.*"}]  # not the requests, nor uploads
    # a presigned PUT acts with the signer's rights: uploads/ only
    assert by_sid["SignUploads"]["Action"] == "s3:PutObject"
    assert by_sid["SignUploads"]["Resource"] == {"Fn::Sub": f"{bucket}/uploads/*"}
    assert by_sid["ListJobsAndUploads"]["Condition"]["StringLike"]["s3:prefix"] == [
        "async/*", "uploads/*"]


def test_every_function_has_a_log_group_with_retention() -> None:
    groups = resources("AWS::Logs::LogGroup")
    named = {json.dumps(g["Properties"].get("LogGroupName")) for g in groups.values()}
    for name in resources("AWS::Serverless::Function"):
        assert any(name in n for n in named), f"{name} has no log group"
    assert all("RetentionInDays" in g["Properties"] for g in groups.values())


def deployed_api(**parameters: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the API's OpenAPI body as deployed, all resources) for these parameters."""
    deployed = resolved(**parameters)
    (api,) = [r for r in deployed.values() if r["Type"] == "AWS::ApiGatewayV2::Api"]
    return api["Properties"]["Body"], deployed


def test_every_route_requires_iam_auth_by_default() -> None:
    body, deployed = deployed_api()
    operations = [op for item in body["paths"].values() for op in item.values()]
    assert len(operations) == len(openapi_document()["paths"]) == 21
    (scheme_name,) = body["components"]["securitySchemes"]
    for op in operations:  # no route without the scheme, none opting out
        assert op["security"] == [{scheme_name: []}]
    scheme = body["components"]["securitySchemes"][scheme_name]
    assert scheme["x-amazon-apigateway-authtype"] == "awsSigv4"
    # nothing else opens a route: no other authorizer resource, no route resource
    assert not [r for r in deployed.values() if r["Type"] in {
        "AWS::ApiGatewayV2::Authorizer", "AWS::ApiGatewayV2::Route"}]


def test_a_parameter_switches_every_route_to_a_jwt_authorizer() -> None:
    body, _ = deployed_api(ApiAuth="JWT", JwtIssuer="https://issuer.example/pool",
                           JwtAudience="client-1,client-2")
    (scheme_name,) = body["components"]["securitySchemes"]
    scheme = body["components"]["securitySchemes"][scheme_name]
    authorizer = scheme["x-amazon-apigateway-authorizer"]
    assert authorizer["type"] == "jwt"
    assert authorizer["identitySource"] == "$request.header.Authorization"
    assert authorizer["jwtConfiguration"] == {"issuer": "https://issuer.example/pool",
                                              "audience": ["client-1", "client-2"]}
    assert "x-amazon-apigateway-authtype" not in scheme
    for item in body["paths"].values():
        for op in item.values():
            assert op["security"] == [{scheme_name: []}]
    # JWT without an issuer or an audience is refused before anything is created
    rule = template()["Rules"]["JwtNeedsIssuerAndAudience"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "ApiAuth"}, "JWT"]}
    asserted = json.dumps(rule["Assertions"])
    assert "JwtIssuer" in asserted and "JwtAudience" in asserted


@pytest.mark.parametrize(("parameters", "function"), [
    ({}, "ApiFunction"), ({"ApiImageUri": "1.dkr.ecr.us-east-1.amazonaws.com/m:1"},
                          "ImageApiFunction")])
def test_every_route_reaches_the_live_alias_of_the_serving_function(
        parameters: dict[str, str], function: str) -> None:
    body, deployed = deployed_api(**parameters)
    integrations = body["components"]["x-amazon-apigateway-integrations"]
    for item in body["paths"].values():
        for op in item.values():
            ref = op["x-amazon-apigateway-integration"]["$ref"]
            assert ref.rsplit("/", 1)[-1] in integrations
    (integration,) = integrations.values()
    assert integration["type"] == "aws_proxy" and integration["payloadFormatVersion"] == "2.0"
    assert f"${{{function}Aliaslive}}" in integration["uri"]["Fn::Sub"]
    assert deployed[f"{function}Aliaslive"]["Properties"]["Name"] == "live"
    (permission,) = [r for r in deployed.values() if r["Type"] == "AWS::Lambda::Permission"]
    assert permission["Properties"]["FunctionName"] == {"Ref": f"{function}Aliaslive"}
    assert permission["Properties"]["Principal"] == "apigateway.amazonaws.com"
    assert "${HttpApi}/" in permission["Properties"]["SourceArn"]["Fn::Sub"]  # this API only
    functions = [n for n, r in deployed.items() if r["Type"] == "AWS::Lambda::Function"]
    assert sorted(functions) == sorted([function, "BatchFunction", "BatchDeadLetterFunction"])



IMAGE = {"ApiImageUri": "1.dkr.ecr.us-east-1.amazonaws.com/m:1"}


@pytest.mark.parametrize(("parameters", "function"), [
    ({}, "StreamingApiFunction"), (IMAGE, "StreamingImageApiFunction")])
def test_generation_streams_through_a_rest_api_whose_integrations_stream(
        parameters: dict[str, str], function: str) -> None:
    assert not [r for r in resolved(**parameters).values()
                if r["Type"] == "AWS::ApiGateway::RestApi"]  # off by default
    deployed = resolved(GenerationStreaming="true", **parameters)
    (api,) = [r for r in deployed.values() if r["Type"] == "AWS::ApiGateway::RestApi"]
    body = api["Properties"]["Body"]
    served = openapi_document()["paths"]
    streamed = {p for p in served if p.endswith("/generate_stream")} | {
        "/v1/completions", "/v1/chat/completions"}
    assert streamed <= set(body["paths"]) <= set(served)  # every streamed route, no other
    fn = deployed[function]["Properties"]
    for path, item in body["paths"].items():
        for method, op in item.items():
            assert method in served[path], (path, method)
            assert op["security"] == [{"sigv4": []}]
            integration = op["x-amazon-apigateway-integration"]
            assert integration["type"] == "aws_proxy"
            assert integration["responseTransferMode"] == "STREAM"
            assert integration["timeoutInMillis"] <= int(fn["Timeout"]) * 1000
            assert integration["uri"]["Fn::Sub"].endswith(
                f"/2021-11-15/functions/${{{function}Aliaslive}}"
                "/response-streaming-invocations")
            for name in re.findall(r"{(\w+)}", path):  # REST declares its path parameters
                assert {"name": name, "in": "path", "required": True,
                        "schema": {"type": "string"}} in op["parameters"]
    assert body["components"]["securitySchemes"]["sigv4"][
        "x-amazon-apigateway-authtype"] == "awsSigv4"
    (permission,) = [r["Properties"] for r in deployed.values()
                     if r["Type"] == "AWS::Lambda::Permission"
                     and "${StreamingApi}/" in json.dumps(r["Properties"]["SourceArn"])]
    assert permission["FunctionName"] == {"Ref": f"{function}Aliaslive"}
    assert permission["Action"] == "lambda:InvokeFunction"  # InvokeWithResponseStream's
    (stage,) = [r["Properties"] for r in deployed.values()
                if r["Type"] == "AWS::ApiGateway::Stage"]
    assert stage["StageName"] == "live" and stage["TracingEnabled"] is True
    (throttle,) = stage["MethodSettings"]
    assert (int(throttle["ThrottlingRateLimit"]), int(throttle["ThrottlingBurstLimit"])) == (
        100, 200)  # the HTTP API's parameters
    # the function runs modelfn's own Runtime API loop in response mode streaming
    if function == "StreamingApiFunction":
        assert fn["Handler"] == "app.stream_handler"
        assert fn["Environment"]["Variables"]["AWS_LAMBDA_EXEC_WRAPPER"] == \
            "/var/task/stream-bootstrap"
        assert (ROOT / "functions/api/stream-bootstrap").stat().st_mode & 0o111
    else:
        image = fn["ImageConfig"]
        assert image["EntryPoint"] == ["python3", "-m", "modelfn.generate.lambda_stream"]
        assert image["Command"] == ["app.stream_handler"]
        assert fn["Environment"]["Variables"]["MODELFN_STORE"] == "/var/task/modelfn-store"
    assert json.dumps(deployed).count("response-streaming-invocations") == len(
        [op for item in body["paths"].values() for op in item.values()])

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
            # a key pattern such as "${ModelBucket.Arn}/models/*" or
            # ".../async/*/request.json" is scoped; "*" alone or a wildcard in a service,
            # region, account or bucket part is not
            assert isinstance(text, str) and r != "*", s
            assert "*" not in text or (text.startswith("${")
                                       and "*" not in text.split("}/", 1)[0]
                                       and "}/" in text), s


def test_api_stage_is_throttled() -> None:
    (stage,) = [r for r in resolved().values() if r["Type"] == "AWS::ApiGatewayV2::Stage"]
    settings = stage["Properties"]["DefaultRouteSettings"]
    assert settings["ThrottlingRateLimit"] == str(_param_default("ThrottlingRateLimit"))
    assert settings["ThrottlingBurstLimit"] == str(_param_default("ThrottlingBurstLimit"))


def test_every_makefile_build_has_its_target() -> None:
    built = {**resources("AWS::Serverless::Function"),
             **resources("AWS::Serverless::LayerVersion")}
    for name, res in built.items():
        if res["Properties"].get("PackageType") == "Image":
            continue  # built by docker from `modelfn package --image`
        assert res["Metadata"]["BuildMethod"] == "makefile"
        folder = res["Properties"].get("CodeUri") or res["Properties"]["ContentUri"]
        makefile = (ROOT / folder / "Makefile").read_text()
        assert re.search(rf"^build-{name}:", makefile, re.M), f"{folder}/Makefile: {name}"


def test_every_sample_event_matches_a_template_route() -> None:
    route_keys = {f"{method.upper()} {path}" for method, path in api_routes()}
    for path in sorted((ROOT / "events").glob("api-*.json")):
        assert json.loads(path.read_text())["routeKey"] in route_keys, path.name


# --- batch inference ------------------------------------------------------------------

def _param_default(name: str) -> Any:
    return template()["Parameters"][name]["Default"]


def _statements(function: str) -> list[dict[str, Any]]:
    """The function's unconditional grants, from the access policy it attaches."""
    resources_ = template()["Resources"]
    (ref,) = resources_[function]["Properties"]["Policies"]
    document = resources_[ref["Ref"]]["Properties"]["PolicyDocument"]
    return [s for s in document["Statement"] if "Sid" in s]  # not the !If-wrapped ones


def test_batch_files_and_job_requests_notify_the_batch_queue_only() -> None:
    bucket = template()["Resources"]["ModelBucket"]
    configs = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    filters = []
    for config in configs:
        assert config["Event"] == "s3:ObjectCreated:*"
        assert config["Queue"] == {"Fn::GetAtt": ["BatchQueue", "Arn"]}
        filters.append({r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]})
    assert filters == [{"prefix": "inputs/", "suffix": ".jsonl"},
                       {"prefix": "async/", "suffix": "/request.json"}]
    # what the functions write can never trigger them again
    for written in ("outputs/a.jsonl", "async/o/j/status.json", "async/o/j/result.json",
                    "async/o/j/result.jsonl", "uploads/o/u.jsonl", "models/m/1/x.jsonl",
                    "batch-parts/r/00001.jsonl"):
        assert not any(written.startswith(f["prefix"]) and written.endswith(f["suffix"])
                       for f in filters), written
    # the queue's and the access log bucket's policies exist before the bucket uses them
    assert bucket["DependsOn"] == ["BatchQueuePolicy", "AccessLogBucketPolicy"]
    (stmt,) = template()["Resources"]["BatchQueuePolicy"]["Properties"]["PolicyDocument"][
        "Statement"]
    assert stmt["Principal"] == {"Service": "s3.amazonaws.com"}
    assert stmt["Action"] == "sqs:SendMessage"
    assert stmt["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}


def test_jobs_and_uploads_expire_by_lifecycle_after_the_retention_parameter() -> None:
    rules = {r["Id"]: r for r in resolved(JobRetentionDays="3")["ModelBucket"]["Properties"][
        "LifecycleConfiguration"]["Rules"]}
    assert {rules["ExpireJobs"]["Prefix"], rules["ExpireUploads"]["Prefix"]} == {
        "async/", "uploads/"}
    for rule in (rules["ExpireJobs"], rules["ExpireUploads"]):
        assert rule["Status"] == "Enabled" and int(rule["ExpirationInDays"]) == 3
        assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}
    assert _param_default("JobRetentionDays") == 7
    env = resolved()["ApiFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MODELFN_JOB_RETENTION_DAYS"] == "7"  # GET answers 404 from the same day


def test_the_webhook_secret_is_no_echo_and_only_its_arn_is_readable() -> None:
    params = template()["Parameters"]
    assert params["WebhookSecret"]["NoEcho"] is True
    arn = "arn:aws:secretsmanager:us-east-1:111122223333:secret:hooks-AbCdEf"

    def secret_statements(deployed: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in allow_statements(deployed) if "secretsmanager" in json.dumps(
            s["Action"])]

    assert secret_statements(resolved()) == []
    deployed = resolved(WebhookSecretArn=arn, WebhookHosts="hooks.example.com")
    (stmt,) = secret_statements(deployed)
    assert stmt["Action"] == "secretsmanager:GetSecretValue" and stmt["Resource"] == arn
    env = deployed["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MODELFN_WEBHOOK_SECRET_ARN"] == arn
    assert env["MODELFN_WEBHOOK_HOSTS"] == "hooks.example.com"
    rule = template()["Rules"]["WebhooksNeedASecret"]
    assert "WebhookSecretArn" in json.dumps(rule) and "WebhookSecret" in json.dumps(rule)


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
                           "Idempotency", "ReadJobs", "WriteJobResults", "ListJobs",
                           "SendParts", "CountParts", "WriteParts", "ListParts"}
    assert by_sid["ReadInputs"]["Action"] == "s3:GetObject"
    assert by_sid["ReadInputs"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/inputs/*"}
    assert by_sid["WriteOutputs"]["Action"] == ["s3:PutObject", "s3:AbortMultipartUpload",
                                                "s3:DeleteObject"]
    assert by_sid["WriteOutputs"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/outputs/*"}
    assert by_sid["ReadModels"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/models/*"}
    assert by_sid["Idempotency"]["Resource"] == {"Fn::GetAtt": ["IdempotencyTable", "Arn"]}
    # jobs: it reads requests and uploads, and writes states and results, never requests
    assert by_sid["ReadJobs"]["Resource"] == [{"Fn::Sub": "${ModelBucket.Arn}/async/*"},
                                              {"Fn::Sub": "${ModelBucket.Arn}/uploads/*"}]
    assert by_sid["WriteJobResults"]["Resource"] == [
        {"Fn::Sub": "${ModelBucket.Arn}/async/*/status.json"},
        {"Fn::Sub": "${ModelBucket.Arn}/async/*/result.*"}]
    assert by_sid["ListJobs"]["Condition"]["StringLike"]["s3:prefix"] == ["async/*"]
    for stmt in by_sid.values():
        actions = stmt["Action"] if isinstance(stmt["Action"], list) else [stmt["Action"]]
        assert all("*" not in a for a in actions) and stmt["Resource"] != "*"


def test_split_files_fan_out_on_the_batch_queue_with_least_privilege_as_deployed() -> None:
    deployed = resolved(BatchPartLines="5000", BatchPartBytes="8388608",
                        BatchMaxConcurrency="7")
    role = deployed["BatchFunctionRole"]["Properties"]
    assert {"Ref": "BatchAccessPolicy"} in role["ManagedPolicyArns"]
    policy = deployed["BatchAccessPolicy"]["Properties"]["PolicyDocument"]
    by_sid = {s["Sid"]: s for s in policy["Statement"] if "Sid" in s}
    # its own queue (the parts), its own table (the count), batch-parts/ (the part files)
    assert by_sid["SendParts"]["Action"] == "sqs:SendMessage"
    assert by_sid["SendParts"]["Resource"] == {"Fn::GetAtt": ["BatchQueue", "Arn"]}
    assert by_sid["CountParts"]["Action"] == ["dynamodb:GetItem", "dynamodb:PutItem",
                                              "dynamodb:UpdateItem"]
    assert by_sid["CountParts"]["Resource"] == {"Fn::GetAtt": ["BatchRunsTable", "Arn"]}
    assert by_sid["WriteParts"]["Resource"] == {"Fn::Sub": "${ModelBucket.Arn}/batch-parts/*"}
    assert "s3:DeleteObject" in by_sid["WriteParts"]["Action"]
    assert by_sid["ListParts"]["Condition"]["StringLike"]["s3:prefix"] == ["batch-parts/*"]
    # nothing else may delete, send or write a table
    for sid, stmt in by_sid.items():
        text = json.dumps(stmt["Action"])
        if sid not in {"WriteParts", "Idempotency", "WriteOutputs"}:
            assert "Delete" not in text, sid
        if sid != "SendParts":
            assert "sqs:" not in text, sid
    table = deployed["BatchRunsTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST" and table["SSESpecification"] == {
        "SSEEnabled": True}
    assert table["KeySchema"] == [{"AttributeName": "run", "KeyType": "HASH"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires", "Enabled": True}
    env = deployed["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MODELFN_BATCH_RUNS_TABLE"] == {"Ref": "BatchRunsTable"}
    assert env["MODELFN_BATCH_QUEUE_URL"] == {"Ref": "BatchQueue"}
    assert (env["MODELFN_BATCH_PART_LINES"], env["MODELFN_BATCH_PART_BYTES"]) == (
        "5000", "8388608")
    (mapping,) = [r["Properties"] for r in deployed.values()
                  if r["Type"] == "AWS::Lambda::EventSourceMapping" and r["Properties"][
                      "EventSourceArn"] == {"Fn::GetAtt": ["BatchQueue", "Arn"]}]
    assert mapping["BatchSize"] == 1  # one file or one part an invocation
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": "7"}
    rules = {r["Id"]: r for r in deployed["ModelBucket"]["Properties"][
        "LifecycleConfiguration"]["Rules"]}
    assert rules["ExpireBatchParts"]["Prefix"] == "batch-parts/"
    assert rules["ExpireBatchParts"]["ExpirationInDays"] == 5
    assert rules["ExpireBatchParts"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1}
    # the notifications never match what the parts write
    for notify in deployed["ModelBucket"]["Properties"]["NotificationConfiguration"][
            "QueueConfigurations"]:
        assert not "batch-parts/".startswith(notify["Filter"]["S3Key"]["Rules"][0]["Value"])


def test_idempotency_table_is_on_demand_with_ttl() -> None:
    table = template()["Resources"]["IdempotencyTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    env = template()["Resources"]["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert env["MODELFN_IDEMPOTENCY_TABLE"] == {"Ref": "IdempotencyTable"}


# --- operating it: rollout, cold-start controls, observability ---------------------------

def alarms(deployed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: r["Properties"] for n, r in deployed.items()
            if r["Type"] == "AWS::CloudWatch::Alarm"}


@pytest.mark.parametrize("parameters", [{}, {"ApiImageUri": "1.dkr.ecr.us-east-1.amazonaws"
                                                            ".com/m:1"}])
def test_every_function_rolls_out_through_codedeploy_with_alarms_that_roll_back(
        parameters: dict[str, str]) -> None:
    deployed = resolved(DeploymentType="Canary10Percent10Minutes", **parameters)
    functions = [n for n, r in deployed.items() if r["Type"] == "AWS::Lambda::Function"]
    assert len(functions) == 3  # the API, the batch function, its dead letters' consumer
    for name in functions:
        alias = deployed[f"{name}Aliaslive"]
        assert alias["Properties"]["FunctionVersion"]["Fn::GetAtt"][1] == "Version"
        # CodeDeploy shifts the alias: SAM's UpdatePolicy names the deployment group
        hook = alias["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"]
        group = deployed[hook["DeploymentGroupName"]["Ref"]]["Properties"]
        assert group["DeploymentConfigName"]["Fn::Sub"] == [
            "CodeDeployDefault.Lambda${ConfigName}", {"ConfigName": "Canary10Percent10Minutes"}]
        assert group["AutoRollbackConfiguration"]["Enabled"] is True
        assert "DEPLOYMENT_STOP_ON_ALARM" in group["AutoRollbackConfiguration"]["Events"]
        watched = {a["Name"]["Ref"] for a in group["AlarmConfiguration"]["Alarms"]}
        assert group["AlarmConfiguration"]["Enabled"] is True and len(watched) >= 2
        assert watched <= set(alarms(deployed))
    serving = next(n for n in functions if "Api" in n)
    api_group = deployed[deployed[f"{serving}Aliaslive"]["UpdatePolicy"][
        "CodeDeployLambdaAliasUpdate"]["DeploymentGroupName"]["Ref"]]
    watched = {a["Name"]["Ref"] for a in api_group["Properties"]["AlarmConfiguration"][
        "Alarms"]}
    found = alarms(deployed)
    # errors of the live alias, 5xx answers, and p99 latency of the live alias
    assert {"ApiErrorsAlarm", "ApiServerErrorsAlarm", "ApiLatencyP99Alarm"} <= watched
    latency = found["ApiLatencyP99Alarm"]
    assert latency["ExtendedStatistic"] == "p99" and latency["MetricName"] == "Duration"
    assert latency["Threshold"] == str(_param_default("LatencyAlarmP99Ms"))
    for name in ("ApiErrorsAlarm", "ApiLatencyP99Alarm"):
        dims = {d["Name"]: d["Value"] for d in found[name]["Dimensions"]}
        assert dims == {"FunctionName": {"Ref": serving},
                        "Resource": {"Fn::Sub": f"${{{serving}}}:live"}}
    server = found["ApiServerErrorsAlarm"]
    assert (server["Namespace"], server["MetricName"]) == ("modelfn", "ServerErrors")


def test_deployment_type_is_any_codedeploy_lambda_config() -> None:
    allowed = template()["Parameters"]["DeploymentType"]["AllowedValues"]
    assert "AllAtOnce" in allowed and _param_default("DeploymentType").startswith("Canary")
    assert all(re.fullmatch(r"(Canary10Percent\d+Minutes|Linear10PercentEvery\d+Minutes?"
                            r"|AllAtOnce)", v) for v in allowed)


def test_snapstart_is_a_parameter_and_off_by_default() -> None:
    assert "SnapStart" not in resolved()["ApiFunction"]["Properties"]
    on = resolved(SnapStart="true", PreloadModels="digits-cnn")
    assert on["ApiFunction"]["Properties"]["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert "SnapStart" not in on["BatchFunction"]["Properties"]  # only the API's init pays
    assertions = template()["Rules"]["SnapStartNeedsPreloadAndNoProvisionedConcurrency"]
    text = json.dumps(assertions)
    for needed in ("ProvisionedConcurrency", "PreloadModels", "ApiImageUri"):
        assert needed in text


def test_provisioned_concurrency_is_a_parameter_on_the_live_alias() -> None:
    assert "ProvisionedConcurrencyConfig" not in resolved()["ApiFunctionAliaslive"][
        "Properties"]
    alias = resolved(ProvisionedConcurrency="3")["ApiFunctionAliaslive"]["Properties"]
    assert alias["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": "3"}
    image = resolved(ProvisionedConcurrency="2", ApiImageUri="1.dkr.ecr.x/m:1")
    assert image["ImageApiFunctionAliaslive"]["Properties"][
        "ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": "2"}


def test_memory_size_is_a_parameter() -> None:
    for memory in ("512", "3008"):
        deployed = resolved(MemorySize=memory)
        assert deployed["ApiFunction"]["Properties"]["MemorySize"] == memory


def test_a_models_layer_replaces_s3_on_the_cold_path() -> None:
    default = resolved()["ApiFunction"]["Properties"]
    assert default["Environment"]["Variables"]["MODELFN_STORE"] == {
        "Fn::Sub": "s3://${ModelBucket}"}
    arn = "arn:aws:lambda:us-east-1:123456789012:layer:modelfn-digits-cnn:1"
    deployed = resolved(ModelsLayerArn=arn)
    for fn in ("ApiFunction", "BatchFunction"):
        props = deployed[fn]["Properties"]
        assert arn in props["Layers"] and len(props["Layers"]) == 2
        assert props["Environment"]["Variables"]["MODELFN_STORE"] == "/opt/modelfn-store"


def test_the_image_function_serves_the_store_baked_into_the_image() -> None:
    from modelfn.packaging.bundle import IMAGE_STORE

    deployed = resolved(ApiImageUri="1.dkr.ecr.us-east-1.amazonaws.com/m:1",
                        ModelAlias="canary")
    props = deployed["ImageApiFunction"]["Properties"]
    assert props["PackageType"] == "Image"
    assert props["Code"] == {"ImageUri": "1.dkr.ecr.us-east-1.amazonaws.com/m:1"}
    assert "Runtime" not in props and "Handler" not in props and "Layers" not in props
    env = props["Environment"]["Variables"]
    assert env["MODELFN_STORE"] == IMAGE_STORE and env["MODELFN_ALIAS"] == "canary"


def test_functions_trace_with_xray_and_serve_the_configured_alias() -> None:
    deployed = resolved(ModelAlias="canary")
    for fn in ("ApiFunction", "BatchFunction"):
        props = deployed[fn]["Properties"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert props["Environment"]["Variables"]["MODELFN_ALIAS"] == "canary"
        assert props["Environment"]["Variables"]["POWERTOOLS_METRICS_NAMESPACE"] == "modelfn"


def dashboard(**parameters: str) -> dict[str, Any]:
    body = resolved(**parameters)["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    text, names = body
    for name in [*names, "AWS::Region"]:
        text = text.replace(f"${{{name}}}", "X")
    text = re.sub(r"\$\{(\w+)\.Arn\}", r"arn:\1", text)
    assert "${" not in text
    return json.loads(text)  # type: ignore[no-any-return]


def test_dashboard_is_valid_json_and_shows_latency_errors_batches_cold_starts() -> None:
    widgets = dashboard()["widgets"]
    text = json.dumps(widgets)
    for metric in ("InferenceLatency", "Inferences", "RequestErrors", "BatchSize",
                   "ColdStart", "SnapStartRestores", "Duration", "Throttles"):
        assert metric in text, metric
    (alarm_widget,) = [w for w in widgets if w["type"] == "alarm"]
    shown = {a.removeprefix("arn:") for a in alarm_widget["properties"]["alarms"]}
    assert shown == set(alarms(resolved()))  # every alarm the stack has


def test_samconfig_has_dev_and_prod_profiles() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    known = set(template()["Parameters"])

    def overrides(env: str) -> dict[str, str]:
        text = config[env]["deploy"]["parameters"]["parameter_overrides"]
        pairs = dict(p.split("=", 1) for p in text.split())
        assert set(pairs) <= known, set(pairs) - known
        return pairs

    dev, prod = overrides("dev"), overrides("prod")
    assert dev["DeploymentType"] == "AllAtOnce"
    assert prod["DeploymentType"].startswith(("Canary", "Linear"))
    assert config["dev"]["global"]["parameters"]["stack_name"] != config["prod"]["global"][
        "parameters"]["stack_name"]
    assert config["prod"]["deploy"]["parameters"]["confirm_changeset"] is True
    assert int(prod["LogRetentionDays"]) > int(dev["LogRetentionDays"])


def version_ids(**parameters: str) -> set[str]:
    return {name for name, res in resolved(**parameters).items()
            if res["Type"] == "AWS::Lambda::Version"}


def test_sam_publishes_versions_for_code_not_for_parameters() -> None:
    """Why `make deploy` writes the parameters into the functions' code: SAM names a
    function's Version after a hash of its code and unresolved properties, so a deploy
    that changes only a parameter would leave the live alias on the old version."""
    default = version_ids()
    assert len(default) == 3
    assert version_ids(MemorySize="512", PreloadModels="minilm") == default
    moved = resolved()["ApiFunction"]["Properties"]["Code"]
    assert moved == {"S3Bucket": "artifacts", "S3Key": "functions/api.zip"}


def test_each_function_build_writes_the_deploy_parameters_into_its_code(tmp_path: Path
                                                                        ) -> None:
    import hashlib
    import os

    for function, target in (("api", "build-ApiFunction"), ("batch", "build-BatchFunction")):
        digests = []
        for params in ("MemorySize=1769", "MemorySize=512 PreloadModels=minilm", ""):
            out = tmp_path / function / str(len(digests))
            out.mkdir(parents=True)
            env = {**os.environ, "MODELFN_DEPLOY_PARAMETERS": params}
            subprocess.run(["make", "-s", target, f"ARTIFACTS_DIR={out}"], check=True,
                           cwd=ROOT / "functions" / function, env=env, timeout=60)
            assert (out / "deploy-parameters.txt").read_text() == params + "\n"
            digests.append(hashlib.sha256(b"".join(
                p.read_bytes() for p in sorted(out.iterdir()))).hexdigest())
        assert len(set(digests)) == 3  # another artefact, so another S3 key and version


def test_deploy_parameters_merge_the_profile_with_overrides(
        capsys: pytest.CaptureFixture[str]) -> None:
    from modelfn.cli import main

    assert main(["deploy-parameters", "--config-env", "prod", "PreloadModels=minilm",
                 "Architecture=arm64"]) == 0
    values = dict(p.split("=", 1) for p in capsys.readouterr().out.split())
    assert values["DeploymentType"] == "Canary10Percent10Minutes"  # from the profile
    assert values["PreloadModels"] == "minilm" and values["Architecture"] == "arm64"
    assert main(["deploy-parameters", "--config-env", "prod", "--architecture",
                 "Architecture=arm64"]) == 0
    assert capsys.readouterr().out.strip() == "arm64"
    for argv, message in ((["Nope=1"], "no parameter 'Nope'"),
                          (["Architecture=sparc"], "allowed values"),
                          (["--config-env", "staging"], "no [staging] profile"),
                          (["MemorySize"], "expected Name=Value")):
        assert main(["deploy-parameters", *argv]) == 2
        assert message in capsys.readouterr().err


def test_make_deploy_builds_and_deploys_the_same_parameters() -> None:
    """What `make deploy` runs, without running it (no AWS here): one parameter string,
    in the build's environment (into the code) and in sam deploy's overrides."""
    out = subprocess.run(["make", "-n", "deploy", "ENV=prod", "OVERRIDES=MemorySize=512"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "deploy-parameters --config-env prod MemorySize=512" in text
    assert 'MODELFN_DEPLOY_PARAMETERS="$params"' in text
    assert "sam build" in text and "--parameter-overrides $params" in text
    assert "sam deploy --config-env prod --parameter-overrides $params" in text
    assert "package-check --arch $arch" in text


def test_cors_is_off_by_default_and_the_parameter_gives_the_local_gateways_lists() -> None:
    from modelfn.local import apigw

    def cors(**parameters: str) -> Any:
        apis = [r for r in resolved(**parameters).values()
                if r["Type"] == "AWS::ApiGatewayV2::Api"]
        (api,) = apis
        return api["Properties"]["Body"].get("x-amazon-apigateway-cors")

    assert cors() is None
    config = cors(CorsAllowOrigins="https://app.example.com,http://localhost:5173")
    assert config["allowOrigins"] in (["https://app.example.com", "http://localhost:5173"],
                                      {"Fn::Split": [",", "https://app.example.com,"
                                                          "http://localhost:5173"]})
    assert config["allowMethods"] == list(apigw.CORS_METHODS)
    assert config["allowHeaders"] == list(apigw.CORS_HEADERS)
    assert config["exposeHeaders"] == list(apigw.CORS_EXPOSE)
    assert config["maxAge"] == apigw.CORS_MAX_AGE
    pattern = re.compile(template()["Parameters"]["CorsAllowOrigins"]["AllowedPattern"])
    for good in ("", "*", "https://a.example.com", "https://a.example.com:8443,http://x:1"):
        assert pattern.fullmatch(good), good
    for bad in ("a.example.com", "https://a.example.com/app", "https://a, https://b"):
        assert not pattern.fullmatch(bad), bad
