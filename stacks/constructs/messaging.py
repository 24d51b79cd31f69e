"""The model-events topic, one queue per client, the finalize queue and the dead-letter queues."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, Duration
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from fedstream.stacks import constants
from fedstream.stacks.constructs.nag import acknowledge


class Messaging(Construct):
    """Everything that carries a message.

    ``topic``: "global model ready" / "training complete", fanned out to ``client_queues`` (raw
    delivery, so a client reads the JSON message itself). A client queue accepts messages from
    this topic only. ``finalize_queue`` (sync mode only, server-only) carries the state machine's
    round token and "the round's deadline passed" to the finalize function. ``stream_failures``
    receives the records the stream handlers gave up on. Every queue and the topic are encrypted
    with the stack key, TLS only.

    Who may publish to the topic (``only_these_publish``) and send to the finalize queue
    (``only_these_request_finalize``) is known once the state machine's or the async function's
    role exists: those constructs call the two functions below.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        key: kms.IKey,
        client_ids: Sequence[str],
        with_finalize_queue: bool,
        finalize_visibility: Duration,
    ) -> None:
        super().__init__(scope, construct_id)
        self._key = key
        self.topic = sns.Topic(
            self, "ModelEvents", display_name="fedstream model events", master_key=key, enforce_ssl=True
        )
        self.client_dead_letters = self._dead_letter_queue("ClientDeadLetters")
        self.client_queues = {client_id: self._client_queue(client_id) for client_id in client_ids}
        self.finalize_dead_letters: sqs.Queue | None = None
        self.finalize_queue: sqs.Queue | None = None
        if with_finalize_queue:
            self.finalize_dead_letters = self._dead_letter_queue("FinalizeDeadLetters")
            self.finalize_queue = self._queue(
                "Finalize",
                visibility_timeout=finalize_visibility,
                dead_letter_queue=sqs.DeadLetterQueue(
                    max_receive_count=constants.FINALIZE_MAX_RECEIVE_COUNT, queue=self.finalize_dead_letters
                ),
            )
            # Server-only: the state machine sends each round's task token and deadline here; the
            # queue is not subscribed to the model topic, so no client message carries a token.
        self.stream_failures = self._dead_letter_queue("StreamFailures")
        acknowledge(
            self.stream_failures,
            "AwsSolutions-SQS3",
            "The on-failure destination of the stream event source mappings is itself the last stop; "
            "it keeps records 14 days and raises the DeadLettersNotEmpty alarm.",
        )

    @property
    def dead_letter_queues(self) -> dict[str, sqs.Queue]:
        queues = {"clients": self.client_dead_letters, "stream-failures": self.stream_failures}
        if self.finalize_dead_letters is not None:
            queues["finalize"] = self.finalize_dead_letters
        return queues

    def _queue(self, construct_id: str, **props) -> sqs.Queue:
        return sqs.Queue(
            self,
            construct_id,
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self._key,
            data_key_reuse=Duration.minutes(15),
            enforce_ssl=True,
            **props,
        )

    def _dead_letter_queue(self, construct_id: str) -> sqs.Queue:
        return self._queue(construct_id, retention_period=Duration.days(constants.DLQ_RETENTION_DAYS))

    def _client_queue(self, client_id: str) -> sqs.Queue:
        queue = self._queue(
            f"Client-{client_id}",
            retention_period=Duration.days(constants.CLIENT_QUEUE_RETENTION_DAYS),
            visibility_timeout=Duration.seconds(constants.CLIENT_QUEUE_VISIBILITY_SECONDS),
            dead_letter_queue=sqs.DeadLetterQueue(
                max_receive_count=constants.CLIENT_MAX_RECEIVE_COUNT, queue=self.client_dead_letters
            ),
        )
        # Built by hand rather than with SqsSubscription: that one writes the topic's ARN into the key
        # policy, and the topic is encrypted with the same key (a dependency cycle). The key lets SNS
        # deliver from this account's topics (EncryptionKey); the queue policy below admits only ours.
        queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="NothingElseSends",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sqs:SendMessage"],
                resources=[queue.queue_arn],
                conditions={"ArnNotEquals": {"aws:SourceArn": self.topic.topic_arn}},
            )
        )
        self._subscribe(f"Client-{client_id}", queue)
        return queue

    def _subscribe(self, construct_id: str, queue: sqs.Queue) -> None:
        """Raw delivery from the model topic, which the queue policy admits by its ARN."""
        allowed = queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="TheModelEventsTopicSends",
                principals=[iam.ServicePrincipal("sns.amazonaws.com")],
                actions=["sqs:SendMessage"],
                resources=[queue.queue_arn],
                conditions={"ArnEquals": {"aws:SourceArn": self.topic.topic_arn}},
            )
        )
        subscription = sns.Subscription(
            self,
            f"{construct_id}-Subscription",
            topic=self.topic,
            endpoint=queue.queue_arn,
            protocol=sns.SubscriptionProtocol.SQS,
            raw_message_delivery=True,
        )
        if allowed.policy_dependable is not None:
            subscription.node.add_dependency(allowed.policy_dependable)


# An operator (a role or user of this account) tagged with this key and the stack's name may publish
# to the topic in async mode, where there is no state machine and ``start_run`` publishes version 0.
OPERATOR_PUBLISHER_TAG = "fedstream-publisher"


def only_these_publish(
    topic: sns.ITopic, publishers: Sequence[iam.IRole], *, tagged_operators: bool = False
) -> None:
    """Deny ``sns:Publish`` on the topic to every principal but ``publishers``.

    Call once per topic: a second deny statement would leave no one able to publish. With
    ``tagged_operators``, principals tagged ``fedstream-publisher=<stack name>`` may publish too.
    A message on this topic reaches every client queue and the finalize queue's subscription.
    """
    conditions: dict[str, dict[str, object]] = {
        "ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in publishers]}
    }
    if tagged_operators:
        conditions["StringNotEquals"] = {f"aws:PrincipalTag/{OPERATOR_PUBLISHER_TAG}": Aws.STACK_NAME}
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="OnlyTheServerPublishes",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            conditions=conditions,
        )
    )


def only_these_request_finalize(queue: sqs.IQueue, senders: Sequence[iam.IRole]) -> None:
    """Deny ``sqs:SendMessage`` on the finalize queue to all but ``senders`` (the state machine)."""
    queue.add_to_resource_policy(
        iam.PolicyStatement(
            sid="OnlyTheStateMachineSends",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sqs:SendMessage"],
            resources=[queue.queue_arn],
            conditions={"ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in senders]}},
        )
    )
