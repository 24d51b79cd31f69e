"""What each mode deploys: storage, messaging, functions, orchestration, dashboard, alarms, outputs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aws_cdk.assertions import Match
from fedstream.stacks import constants

from fedstream.settings import ClientSettings, HandlerSettings
from tests.infrastructure.conftest import CLIENTS, Synth, render, synthesize


def only(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    assert len(resources) == 1, sorted(resources)
    return next(iter(resources.values()))["Properties"]


def logical_id(synth: Synth, resource_type: str, path_part: str) -> str:
    matches = [
        k
        for k, v in synth.resources(resource_type).items()
        if path_part in v.get("Metadata", {}).get("aws:cdk:path", k)
    ]
    assert len(matches) == 1, (resource_type, path_part, matches)
    return matches[0]


def key_arn(synth: Synth) -> dict[str, Any]:
    return {"Fn::GetAtt": [next(iter(synth.resources("AWS::KMS::Key"))), "Arn"]}


# -- encryption --------------------------------------------------------------------------------


def test_one_customer_key_with_rotation(synth: Synth):
    key = only(synth.resources("AWS::KMS::Key"))
    assert key["EnableKeyRotation"] is True


def test_every_queue_topic_bucket_table_and_log_group_is_encrypted(synth: Synth):
    key = key_arn(synth)
    for queue_id, queue in synth.resources("AWS::SQS::Queue").items():
        assert queue["Properties"]["KmsMasterKeyId"] == key, queue_id
    for topic_id, topic in synth.resources("AWS::SNS::Topic").items():
        assert topic["Properties"]["KmsMasterKeyId"] == key, topic_id
    for table_id, table in synth.resources("AWS::DynamoDB::Table").items():
        assert table["Properties"]["SSESpecification"] == {
            "KMSMasterKeyId": key,
            "SSEEnabled": True,
            "SSEType": "KMS",
        }, table_id
    for group_id, group in synth.resources("AWS::Logs::LogGroup").items():
        assert group["Properties"]["KmsKeyId"] == key, group_id
    buckets = synth.resources("AWS::S3::Bucket")
    assert len(buckets) == 2
    for bucket_id, bucket in buckets.items():
        rules = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rules and rules[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"aws:kms", "AES256"}, (
            bucket_id
        )


# -- storage -----------------------------------------------------------------------------------


def test_model_bucket_is_kms_versioned_private_and_tls_only(synth: Synth):
    models = logical_id(synth, "AWS::S3::Bucket", "Storage/Models")
    props = synth.resources("AWS::S3::Bucket")[models]["Properties"]
    encryption = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert encryption["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": key_arn(synth),
    }
    assert encryption["BucketKeyEnabled"] is True
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["PublicAccessBlockConfiguration"] == dict.fromkeys(
        ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"), True
    )
    assert "LoggingConfiguration" in props
    policy = next(
        p["Properties"]["PolicyDocument"]
        for p in synth.resources("AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": models}
    )
    assert any(
        s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for s in policy["Statement"]
    )


def test_old_client_updates_expire_by_tag_and_old_versions_are_cleaned(synth: Synth):
    models = logical_id(synth, "AWS::S3::Bucket", "Storage/Models")
    rules = {
        r["Id"]: r
        for r in synth.resources("AWS::S3::Bucket")[models]["Properties"]["LifecycleConfiguration"]["Rules"]
    }
    tag_key, tag_value = constants.UPDATE_OBJECT_TAG
    updates = rules["expire-client-updates"]
    assert updates["TagFilters"] == [{"Key": tag_key, "Value": tag_value}]
    assert updates["ExpirationInDays"] == 30 and updates["Status"] == "Enabled"
    tidy = rules["tidy-versions-and-uploads"]
    assert tidy["NoncurrentVersionExpiration"]["NoncurrentDays"] == constants.NONCURRENT_VERSION_DAYS
    assert tidy["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1


def test_updates_table_is_keyed_by_client_and_streams_new_images(synth: Synth):
    synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [
                {"AttributeName": "client_id", "KeyType": "HASH"},
                {"AttributeName": "update_id", "KeyType": "RANGE"},
            ],
            "BillingMode": "PAY_PER_REQUEST",
            "StreamSpecification": {"StreamViewType": "NEW_IMAGE"},
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
        },
    )


def test_run_table_is_keyed_by_run_and_sort_key(synth: Synth):
    synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [
                {"AttributeName": "run_id", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            "BillingMode": "PAY_PER_REQUEST",
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "StreamSpecification": Match.absent(),
        },
    )


def test_data_survives_cdk_destroy_by_default(synth: Synth):
    for resource_type in ("AWS::DynamoDB::Table", "AWS::S3::Bucket", "AWS::KMS::Key"):
        for resource_id, resource in synth.resources(resource_type).items():
            assert resource["DeletionPolicy"] == "Retain", resource_id
    for table in synth.resources("AWS::DynamoDB::Table").values():
        assert table["Properties"]["DeletionProtectionEnabled"] is True


# -- messaging ---------------------------------------------------------------------------------


def test_one_queue_per_client_with_a_dead_letter_queue_and_raw_delivery(synth: Synth):
    queues = {
        client: logical_id(synth, "AWS::SQS::Queue", f"Messaging/Client-{client}/") for client in CLIENTS
    }
    dead_letters = logical_id(synth, "AWS::SQS::Queue", "Messaging/ClientDeadLetters/")
    topic = logical_id(synth, "AWS::SNS::Topic", "Messaging/ModelEvents/")
    subscriptions = synth.resources("AWS::SNS::Subscription")
    # one per client, nothing else: the finalize queue is server-only (the state machine sends to it)
    assert len(subscriptions) == len(CLIENTS)
    for client, queue_id in queues.items():
        queue = synth.resources("AWS::SQS::Queue")[queue_id]["Properties"]
        assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": [dead_letters, "Arn"]}, client
        assert queue["RedrivePolicy"]["maxReceiveCount"] == constants.CLIENT_MAX_RECEIVE_COUNT
        (subscription,) = [
            s["Properties"]
            for s in subscriptions.values()
            if s["Properties"]["Endpoint"] == {"Fn::GetAtt": [queue_id, "Arn"]}
        ]
        assert subscription["Protocol"] == "sqs" and subscription["RawMessageDelivery"] is True
        assert subscription["TopicArn"] == {"Ref": topic}


def test_a_client_queue_accepts_messages_from_the_model_topic_only(synth: Synth):
    topic = {"Ref": logical_id(synth, "AWS::SNS::Topic", "Messaging/ModelEvents/")}
    for client in CLIENTS:
        queue_id = logical_id(synth, "AWS::SQS::Queue", f"Messaging/Client-{client}/")
        (policy,) = [
            p["Properties"]["PolicyDocument"]["Statement"]
            for p in synth.resources("AWS::SQS::QueuePolicy").values()
            if p["Properties"]["Queues"] == [{"Ref": queue_id}]
        ]
        allows = [s for s in policy if s["Effect"] == "Allow"]
        assert allows == [
            {
                "Action": "sqs:SendMessage",
                "Condition": {"ArnEquals": {"aws:SourceArn": topic}},
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Resource": {"Fn::GetAtt": [queue_id, "Arn"]},
                "Sid": "TheModelEventsTopicSends",
            }
        ]
        assert any(
            s["Effect"] == "Deny"
            and s["Action"] == "sqs:SendMessage"
            and s["Principal"] == {"AWS": "*"}
            and s["Condition"] == {"ArnNotEquals": {"aws:SourceArn": topic}}
            for s in policy
        ), client


def test_sync_has_the_state_machine_and_finalize_queue_async_has_neither(
    sync_synth: Synth, async_synth: Synth
):
    assert len(sync_synth.resources("AWS::StepFunctions::StateMachine")) == 1
    assert logical_id(sync_synth, "AWS::SQS::Queue", "Messaging/Finalize/")
    assert async_synth.resources("AWS::StepFunctions::StateMachine") == {}
    paths = [v["Metadata"]["aws:cdk:path"] for v in async_synth.resources("AWS::SQS::Queue").values()]
    assert not [p for p in paths if "Finalize" in p]


# -- functions ---------------------------------------------------------------------------------

HANDLERS = {
    "sync": {constants.HANDLER_AGGREGATE, constants.HANDLER_FINALIZE},
    "async": {constants.HANDLER_ASYNC_UPDATE},
}


def test_each_mode_deploys_its_handlers(synth: Synth):
    functions = synth.resources("AWS::Lambda::Function").values()
    assert {f["Properties"]["Handler"] for f in functions} == HANDLERS[synth.mode]


def test_functions_are_sized_traced_and_on_the_stated_runtime(synth: Synth):
    for function in synth.resources("AWS::Lambda::Function").values():
        props = function["Properties"]
        assert props["Runtime"] == constants.LAMBDA_RUNTIME.name == "python3.13"
        assert props["Architectures"] == ["x86_64"]
        assert props["MemorySize"] == synth.stack.config.memory_mb >= 1024
        assert props["Timeout"] >= 300
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert "LoggingConfig" in props


def test_functions_get_memory_for_an_aggregator_that_holds_every_update(sync_synth: Synth, tmp_path):
    # GIVEN the sync deployment again, with median keeping each of the 3 clients' updates of a round
    robust = synthesize("sync", tmp_path, aggregator="median", aggregator_params="{}")

    sizes = {f["Properties"]["MemorySize"] for f in robust.resources("AWS::Lambda::Function").values()}
    # THEN every function gets 3 more model sizes (max_model_mb 100) than a streaming aggregator's
    assert sizes == {robust.stack.config.memory_mb}
    assert robust.stack.config.memory_mb >= sync_synth.stack.config.memory_mb + 3 * 100


def test_function_environment_is_the_handler_settings(synth: Synth):
    for function in synth.resources("AWS::Lambda::Function").values():
        env = function["Properties"]["Environment"]["Variables"]
        # Resource references become placeholder strings; everything else must load as-is.
        settings = HandlerSettings.from_env(render(env))
        assert settings.mode == synth.mode
        assert settings.aggregator == synth.stack.config.aggregator
        assert settings.client_ids == CLIENTS
        assert settings.max_model_bytes == synth.stack.config.max_model_mb * 2**20
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == constants.METRIC_NAMESPACE
        fedstream_vars = {k for k in env if k.startswith("FEDSTREAM_")}
        assert fedstream_vars == set(settings.to_env())


def test_sync_aggregator_parameters_reach_the_functions(sync_synth: Synth):
    for function in sync_synth.resources("AWS::Lambda::Function").values():
        env = function["Properties"]["Environment"]["Variables"]
        assert json.loads(env["FEDSTREAM_AGGREGATOR_PARAMS"])["mu"] == 0.05


def test_stream_mappings_report_item_failures_bisect_retry_boundedly_and_keep_failures(synth: Synth):
    failures = {"Fn::GetAtt": [logical_id(synth, "AWS::SQS::Queue", "Messaging/StreamFailures/"), "Arn"]}
    streams = [
        m["Properties"]
        for m in synth.resources("AWS::Lambda::EventSourceMapping").values()
        if "StreamArn" in json.dumps(m["Properties"]["EventSourceArn"])
    ]
    assert len(streams) == 1
    for mapping in streams:
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert mapping["BisectBatchOnFunctionError"] is True
        assert mapping["MaximumRetryAttempts"] == constants.STREAM_RETRY_ATTEMPTS
        assert mapping["MaximumRecordAgeInSeconds"] == constants.STREAM_MAX_RECORD_AGE_HOURS * 3600
        assert mapping["DestinationConfig"] == {"OnFailure": {"Destination": failures}}
        assert mapping["StartingPosition"] == "TRIM_HORIZON"
        assert mapping["FilterCriteria"] == {"Filters": [{"Pattern": '{"eventName":["INSERT"]}'}]}


def test_async_processes_one_batch_per_shard_at_a_time(async_synth: Synth):
    (mapping,) = async_synth.resources("AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["ParallelizationFactor"] == 1


def test_finalize_queue_feeds_the_finalize_function_with_partial_failures(sync_synth: Synth):
    finalize_queue = logical_id(sync_synth, "AWS::SQS::Queue", "Messaging/Finalize/")
    (mapping,) = [
        m["Properties"]
        for m in sync_synth.resources("AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [finalize_queue, "Arn"]}
    ]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    queue = sync_synth.resources("AWS::SQS::Queue")[finalize_queue]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * constants.AGGREGATE_TIMEOUT_MINUTES * 60
    assert queue["RedrivePolicy"]["maxReceiveCount"] == constants.FINALIZE_MAX_RECEIVE_COUNT


# -- orchestration -----------------------------------------------------------------------------


def test_state_machine_fills_the_placeholders_and_logs_and_traces(sync_synth: Synth):
    machine = only(sync_synth.resources("AWS::StepFunctions::StateMachine"))
    assert machine["DefinitionString"] == constants.STATE_MACHINE_DEFINITION.read_text()
    assert machine["DefinitionSubstitutions"] == {
        "TopicArn": {"Ref": logical_id(sync_synth, "AWS::SNS::Topic", "Messaging/ModelEvents/")},
        "RunTable": {"Ref": logical_id(sync_synth, "AWS::DynamoDB::Table", "Storage/Runs/")},
        "FinalizeQueueUrl": {"Ref": logical_id(sync_synth, "AWS::SQS::Queue", "Messaging/Finalize/")},
    }
    placeholders = set(re.findall(r"\$\{(\w+)\}", machine["DefinitionString"]))
    assert placeholders == set(machine["DefinitionSubstitutions"])
    assert machine["LoggingConfiguration"]["Level"] == "ALL"
    # no execution data: the states' inputs and outputs carry the rounds' task tokens
    assert machine["LoggingConfiguration"]["IncludeExecutionData"] is False
    assert machine["TracingConfiguration"] == {"Enabled": True}


def test_state_machine_role_does_only_what_the_definition_calls(sync_synth: Synth):
    role = logical_id(sync_synth, "AWS::IAM::Role", "Orchestration/Role/")
    (policy,) = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for p in sync_synth.resources("AWS::IAM::Policy").values()
        if p["Properties"]["Roles"] == [{"Ref": role}]
    ]
    by_sid = {s.get("Sid"): s for s in policy}
    assert sorted(by_sid["RunState"]["Action"]) == ["dynamodb:PutItem", "dynamodb:UpdateItem"]
    assert by_sid["PublishModelEvents"]["Action"] == "sns:Publish"
    assert by_sid["RequestFinalize"]["Action"] == "sqs:SendMessage"
    wildcard = [s for s in policy if s["Resource"] == "*"]
    assert all(a.startswith(("logs:", "xray:")) for s in wildcard for a in s["Action"])


def test_only_the_functions_that_close_rounds_read_pinned_update_versions(synth: Synth):
    # A sync round close reads each update at the S3 version its registration checked.
    readers = {}
    for policy in synth.resources("AWS::IAM::Policy").values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if "s3:GetObjectVersion" in actions:
                (role,) = policy["Properties"]["Roles"]
                readers[role["Ref"]] = render(statement["Resource"])
    if synth.mode == "async":
        assert readers == {}
        return
    closers = ("Aggregate", "Finalize")
    expected = {logical_id(synth, "AWS::IAM::Role", f"Functions/{name}Role/") for name in closers}
    assert set(readers) == expected
    for resource in readers.values():
        assert resource.endswith("/runs/*/updates/*")


# -- observability -----------------------------------------------------------------------------


def dashboard_body(synth: Synth) -> str:
    return render(only(synth.resources("AWS::CloudWatch::Dashboard"))["DashboardBody"])


@pytest.mark.parametrize(
    ("mode", "metrics"),
    [("sync", constants.SYNC_METRICS), ("async", constants.ASYNC_METRICS)],
)
def test_dashboard_graphs_the_modes_metrics(synth_mode, mode, metrics):
    widgets = json.loads(dashboard_body(synth_mode(mode)))["widgets"]
    expressions = [
        m[0]["expression"]
        for w in widgets
        for m in w.get("properties", {}).get("metrics", [])
        if isinstance(m[0], dict) and "expression" in m[0]
    ]
    for metric in (*metrics, constants.REJECTED_METRIC):
        assert any(f'Namespace="fedstream" MetricName="{metric}"' in e for e in expressions), metric
    rejected = [
        m[0]
        for w in widgets
        for m in w.get("properties", {}).get("metrics", [])
        if isinstance(m[0], dict) and constants.REJECTED_METRIC in m[0].get("expression", "")
    ]
    assert rejected[0]["label"] == "${PROP('Dim.reason')}"
    titles = {w.get("properties", {}).get("title") for w in widgets}
    assert {"Dead-letter queue depth", "Rejected updates by reason", "Alarms"} <= titles


def alarms(synth: Synth) -> dict[str, dict[str, Any]]:
    return {
        v["Metadata"]["aws:cdk:path"].split("/")[-2]: v["Properties"]
        for v in synth.resources("AWS::CloudWatch::Alarm").values()
    }


def test_alarms_cover_dead_letters_stalls_failed_runs_function_errors_and_a_lagging_stream(
    sync_synth: Synth, async_synth: Synth
):
    assert set(alarms(sync_synth)) == {
        "DeadLettersNotEmpty-clients",
        "DeadLettersNotEmpty-stream-failures",
        "DeadLettersNotEmpty-finalize",
        "ExecutionFailed",
        "NoUpdates",
        "AggregateErrors",
        "AggregateThrottles",
        "FinalizeErrors",
        "FinalizeThrottles",
        "AggregateIteratorAge",
    }
    assert set(alarms(async_synth)) == {
        "DeadLettersNotEmpty-clients",
        "DeadLettersNotEmpty-stream-failures",
        "NoUpdates",
        "AsyncUpdateErrors",
        "AsyncUpdateThrottles",
        "AsyncUpdateIteratorAge",
    }
    for synth, function in ((sync_synth, "Aggregate"), (async_synth, "AsyncUpdate")):
        lagging = alarms(synth)[f"{function}IteratorAge"]
        assert lagging["MetricName"] == "IteratorAge" and lagging["Namespace"] == "AWS/Lambda"
        assert lagging["Statistic"] == "Maximum" and lagging["Period"] == 60
        assert lagging["Threshold"] == constants.ITERATOR_AGE_ALARM_SECONDS * 1000
        (dimension,) = lagging["Dimensions"]
        assert dimension["Value"] == {
            "Ref": logical_id(synth, "AWS::Lambda::Function", f"Functions/{function}/")
        }
        errors = alarms(synth)[f"{function}Errors"]
        assert (errors["MetricName"], errors["Statistic"], errors["Threshold"]) == ("Errors", "Sum", 1)
    topic = {"Ref": logical_id(sync_synth, "AWS::SNS::Topic", "Observability/Alarms/")}
    for name, alarm in alarms(sync_synth).items():
        assert alarm["AlarmActions"] == [topic], name
    no_updates = alarms(sync_synth)["NoUpdates"]
    assert no_updates["ComparisonOperator"] == "LessThanThreshold"
    (stat,) = [m["MetricStat"] for m in no_updates["Metrics"]]
    assert stat["Metric"]["MetricName"] == "SuccessfulRequestLatency" and stat["Stat"] == "SampleCount"
    assert {"Name": "Operation", "Value": "PutItem"} in stat["Metric"]["Dimensions"]
    assert no_updates["EvaluationPeriods"] * stat["Period"] == constants.DEFAULT_STALL_MINUTES * 60


# -- outputs -----------------------------------------------------------------------------------


def test_each_client_gets_a_client_settings_config_and_its_role(synth: Synth):
    outputs = synth.json["Outputs"]
    for client in CLIENTS:
        name = "".join(part.capitalize() for part in client.split("-"))
        config = json.loads(render(outputs[f"Client{name}Config"]["Value"]))
        settings = ClientSettings.model_validate(config)
        assert settings.client_id == client
        queue = logical_id(synth, "AWS::SQS::Queue", f"Messaging/Client-{client}/")
        assert settings.queue_url == f"<{queue}>"
        assert outputs[f"Client{name}RoleArn"]["Value"]["Fn::GetAtt"][1] == "Arn"


def test_sync_outputs_the_run_input_with_the_aggregators_client_settings(
    sync_synth: Synth, async_synth: Synth
):
    outputs = sync_synth.json["Outputs"]
    run_input = json.loads(outputs["RunInputDefaults"]["Value"])
    assert run_input == {
        "rounds": 5,
        "min_clients": 2,
        "round_timeout": 900,
        "target_accuracy": 2.0,
        "client_settings": {"proximal_mu": 0.05},
    }
    assert "StateMachineArn" in outputs
    assert "StateMachineArn" not in async_synth.json["Outputs"]
    # async: `fedstream run start` publishes version 0 with the aggregator's client settings from here
    assert "client_settings" in json.loads(async_synth.json["Outputs"]["RunInputDefaults"]["Value"])


def test_the_outputs_load_as_a_deployment_for_the_run_commands(synth: Synth):
    from fedstream.runs import Deployment

    outputs = {name: render(output["Value"]) for name, output in synth.json["Outputs"].items()}
    deployment = Deployment.from_outputs(outputs)
    assert deployment.mode in ("sync", "async") and deployment.aggregator
    assert sorted(deployment.clients) == sorted(CLIENTS)
    assert (deployment.state_machine_arn is not None) == (deployment.mode == "sync")


STORE_DYNAMODB_CALLS = {  # boto3 call in fedstream/server/store.py -> the IAM action it needs
    ".get_item(": "dynamodb:GetItem",
    ".batch_get_item(": "dynamodb:BatchGetItem",
    ".update_item(": "dynamodb:UpdateItem",
    ".put_item(": "dynamodb:PutItem",
    ".query(": "dynamodb:Query",
    ".scan(": "dynamodb:Scan",
}


def role_actions(synth: Synth, function: str) -> set[str]:
    """Every action the function's role's inline policies allow."""
    fn = logical_id(synth, "AWS::Lambda::Function", f"Functions/{function}/")
    role = synth.resources("AWS::Lambda::Function")[fn]["Properties"]["Role"]["Fn::GetAtt"][0]
    actions: set[str] = set()
    for policy in synth.resources("AWS::IAM::Policy").values():
        if {"Ref": role} in policy["Properties"]["Roles"]:
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                found = statement["Action"]
                actions |= set(found if isinstance(found, list) else [found])
    return actions


def test_stream_functions_may_call_on_dynamodb_exactly_what_the_store_calls(
    sync_synth: Synth, async_synth: Synth
):
    import inspect

    from fedstream.server import store

    # Store methods the functions use (run_items_with_prefix is the local runtime's and the run
    # commands': a Query; list_runs is `fedstream run list`'s: a Scan, with the operator's credentials)
    source = inspect.getsource(store.Store)
    for operator_only in (store.Store.run_items_with_prefix, store.Store.list_runs):
        source = source.replace(inspect.getsource(operator_only), "")
    used = {action for call, action in STORE_DYNAMODB_CALLS.items() if call in source}
    used |= {"dynamodb:PutItem", "dynamodb:UpdateItem"}  # the items of transact_write_items
    assert ".transact_write_items(" in source
    assert used == {"dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"}
    stream_reads = {
        "dynamodb:DescribeStream",
        "dynamodb:GetRecords",
        "dynamodb:GetShardIterator",
        "dynamodb:ListStreams",
    }
    for synth, function in (
        (sync_synth, "Aggregate"),
        (sync_synth, "Finalize"),
        (async_synth, "AsyncUpdate"),
    ):
        granted = {a for a in role_actions(synth, function) if a.startswith("dynamodb:")} - stream_reads
        assert granted == used, function
