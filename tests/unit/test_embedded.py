"""The embedded AWS behaves like the real services where fedstream depends on it."""

from __future__ import annotations

import pytest

from fedstream.local.embedded import EmbeddedAWS


def test_a_topic_delivers_to_every_one_of_150_subscribed_queues() -> None:
    # SNS has no page limit on delivery; moto alone would stop after the first 100 subscriptions
    with EmbeddedAWS() as aws:
        sns, sqs = aws.client("sns"), aws.client("sqs")
        topic = sns.create_topic(Name="t")["TopicArn"]
        urls = []
        for n in range(150):
            url = sqs.create_queue(QueueName=f"q{n}")["QueueUrl"]
            attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
            raw = {"RawMessageDelivery": "true"}
            sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=attributes["QueueArn"], Attributes=raw)
            urls.append(url)

        sns.publish(TopicArn=topic, Message="round 1 ready")

        bodies = [
            [m["Body"] for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])]
            for url in urls
        ]
        assert bodies == [["round 1 ready"]] * 150


def test_a_transaction_is_all_or_nothing_and_says_why_it_was_cancelled() -> None:
    with EmbeddedAWS() as aws:
        ddb = aws.client("dynamodb")
        ddb.create_table(
            TableName="runs",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        ddb.put_item(TableName="runs", Item={"k": {"S": "state"}, "version": {"N": "1"}})

        def flip(expected: int, marker: str) -> None:
            ddb.transact_write_items(
                TransactItems=[
                    {
                        "Update": {
                            "TableName": "runs",
                            "Key": {"k": {"S": "state"}},
                            "UpdateExpression": "SET version = :new",
                            "ConditionExpression": "version = :v",
                            "ExpressionAttributeValues": {":v": {"N": str(expected)}, ":new": {"N": "2"}},
                        }
                    },
                    {
                        "Put": {
                            "TableName": "runs",
                            "Item": {"k": {"S": marker}},
                            "ConditionExpression": "attribute_not_exists(k)",
                        }
                    },
                ]
            )

        # a stale expected version cancels the whole transaction: the marker is not written
        with pytest.raises(ddb.exceptions.TransactionCanceledException) as cancelled:
            flip(expected=0, marker="update#a")
        reasons = [r["Code"] for r in cancelled.value.response["CancellationReasons"]]
        assert reasons == ["ConditionalCheckFailed", "None"]
        assert "Item" not in ddb.get_item(TableName="runs", Key={"k": {"S": "update#a"}})
        # the right one writes both items
        flip(expected=1, marker="update#a")
        state = ddb.get_item(TableName="runs", Key={"k": {"S": "state"}})["Item"]
        assert state["version"] == {"N": "2"}
        assert "Item" in ddb.get_item(TableName="runs", Key={"k": {"S": "update#a"}})
