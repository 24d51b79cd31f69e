"""The embedded AWS behaves like the real services where fedstream depends on it."""

from __future__ import annotations

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
