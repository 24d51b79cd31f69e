"""The CloudWatch dashboard and the alarms (with their encrypted alarm topic).

The handlers emit metrics as EMF log lines in the ``fedstream`` namespace; Powertools adds a
``service`` dimension (and ``reason`` on ``UpdatesRejected``). The graphs use SEARCH expressions
on the metric name so they show every dimension set the handlers emit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct
from fedstream.stacks import constants

PERIOD = Duration.minutes(constants.DASHBOARD_PERIOD_MINUTES)
_WIDE, _HALF, _THIRD, _HEIGHT = 24, 12, 8, 6


def search(metric_name: str, statistic: str, label: str | None = None) -> cloudwatch.MathExpression:
    """Every fedstream metric of that name, whatever its dimensions (one line per dimension set)."""
    return cloudwatch.MathExpression(
        expression=(
            f'SEARCH(\'Namespace="{constants.METRIC_NAMESPACE}" MetricName="{metric_name}"\', '
            f"'{statistic}', {int(PERIOD.to_seconds())})"
        ),
        using_metrics={},
        label=label,
        period=PERIOD,
    )


class Observability(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        mode: str,
        key: kms.IKey,
        functions: Mapping[str, lambda_.Function],
        stream_consumers: Mapping[str, lambda_.Function],
        log_groups: Sequence[logs.ILogGroup],
        dead_letter_queues: Mapping[str, sqs.IQueue],
        updates_table: dynamodb.ITable,
        state_machine: sfn.IStateMachine | None,
        stall_minutes: int,
        alarm_email: str | None,
    ) -> None:
        super().__init__(scope, construct_id)
        self._mode = mode
        self.alarm_topic = sns.Topic(
            self, "Alarms", display_name="fedstream alarms", master_key=key, enforce_ssl=True
        )
        if alarm_email:
            self.alarm_topic.add_subscription(subscriptions.EmailSubscription(alarm_email))
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for name, queue in dead_letter_queues.items():
            self._alarm_dead_letters(name, queue)
        if state_machine is not None:
            self._alarm_failed_executions(state_machine)
        self._alarm_no_updates(updates_table, stall_minutes)
        for name, function in functions.items():
            self._alarm_function_errors(name, function)
        for name, function in stream_consumers.items():
            self._alarm_iterator_age(name, function)
        self.dashboard = self._dashboard(functions, log_groups, dead_letter_queues, state_machine)

    # -- alarms --------------------------------------------------------------------------------

    def _add_alarm(self, construct_id: str, alarm: cloudwatch.Alarm) -> None:
        alarm.add_alarm_action(actions.SnsAction(self.alarm_topic))
        alarm.add_ok_action(actions.SnsAction(self.alarm_topic))
        self.alarms[construct_id] = alarm

    def _alarm_dead_letters(self, name: str, queue: sqs.IQueue) -> None:
        construct_id = "DeadLettersNotEmpty-" + name
        self._add_alarm(
            construct_id,
            cloudwatch.Alarm(
                self,
                construct_id,
                alarm_description=f"fedstream: messages are waiting in the {name} dead-letter queue",
                metric=queue.metric_approximate_number_of_messages_visible(
                    period=Duration.minutes(1), statistic="Maximum"
                ),
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        )

    def _alarm_function_errors(self, name: str, function: lambda_.Function) -> None:
        """Any invocation that raised (a batch the stream retries, a finalize request) or was throttled."""
        for what, metric in (
            ("Errors", function.metric_errors(period=Duration.minutes(1), statistic="Sum")),
            ("Throttles", function.metric_throttles(period=Duration.minutes(1), statistic="Sum")),
        ):
            self._add_alarm(
                f"{name}{what}",
                cloudwatch.Alarm(
                    self,
                    f"{name}{what}",
                    alarm_description=f"fedstream: the {name} function reported {what.lower()}",
                    metric=metric,
                    threshold=1,
                    evaluation_periods=1,
                    comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                    treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                ),
            )

    def _alarm_iterator_age(self, name: str, function: lambda_.Function) -> None:
        """The stream function falls behind, or is stuck on a batch: records wait longer and longer."""
        age = function.metric("IteratorAge", period=Duration.minutes(1), statistic="Maximum")
        self._add_alarm(
            f"{name}IteratorAge",
            cloudwatch.Alarm(
                self,
                f"{name}IteratorAge",
                alarm_description=(
                    f"fedstream: the {name} function's newest stream record was over "
                    f"{constants.ITERATOR_AGE_ALARM_SECONDS} s old for {constants.ITERATOR_AGE_PERIODS} "
                    "minutes: it does not keep up with the updates, or is stuck"
                ),
                metric=age,
                threshold=constants.ITERATOR_AGE_ALARM_SECONDS * 1000,  # the metric is in milliseconds
                evaluation_periods=constants.ITERATOR_AGE_PERIODS,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        )

    def _alarm_failed_executions(self, state_machine: sfn.IStateMachine) -> None:
        failed = cloudwatch.MathExpression(
            expression="FILL(failed, 0) + FILL(timedOut, 0) + FILL(aborted, 0)",
            using_metrics={
                "failed": state_machine.metric_failed(period=Duration.minutes(1)),
                "timedOut": state_machine.metric_timed_out(period=Duration.minutes(1)),
                "aborted": state_machine.metric_aborted(period=Duration.minutes(1)),
            },
            label="executions failed, timed out or aborted",
            period=Duration.minutes(1),
        )
        self._add_alarm(
            "ExecutionFailed",
            cloudwatch.Alarm(
                self,
                "ExecutionFailed",
                alarm_description=(
                    "fedstream: a sync run (a state machine execution) failed, timed out or was aborted"
                ),
                metric=failed,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        )

    def _alarm_no_updates(self, updates_table: dynamodb.ITable, stall_minutes: int) -> None:
        # A client's update is one successful PutItem on the updates table (the handlers only read it).
        puts = updates_table.metric_successful_request_latency(
            dimensions_map={"TableName": updates_table.table_name, "Operation": "PutItem"},
            statistic="SampleCount",
            period=PERIOD,
            label="client updates",
        )
        self._add_alarm(
            "NoUpdates",
            cloudwatch.Alarm(
                self,
                "NoUpdates",
                alarm_description=(
                    f"fedstream: no client update for {stall_minutes} minutes. Expected after a run ends "
                    "(the alarm notifies on the transition); during a run it means the clients have stalled."
                ),
                metric=puts,
                threshold=1,
                evaluation_periods=math.ceil(stall_minutes / constants.DASHBOARD_PERIOD_MINUTES),
                comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
            ),
        )

    # -- dashboard -----------------------------------------------------------------------------

    def _graph(
        self, title: str, metrics: Sequence[cloudwatch.IMetric], width: int = _THIRD, **props
    ) -> cloudwatch.GraphWidget:
        return cloudwatch.GraphWidget(
            title=title, left=list(metrics), width=width, height=_HEIGHT, period=PERIOD, **props
        )

    def _dashboard(
        self,
        functions: Mapping[str, lambda_.Function],
        log_groups: Sequence[logs.ILogGroup],
        dead_letter_queues: Mapping[str, sqs.IQueue],
        state_machine: sfn.IStateMachine | None,
    ) -> cloudwatch.Dashboard:
        dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.hours(6))
        dashboard.add_widgets(
            cloudwatch.TextWidget(
                markdown=(
                    f"# fedstream ({self._mode} mode)\n"
                    "Metrics come from the handlers' EMF logs in the `fedstream` namespace; alarms notify "
                    "the "
                    "alarm topic. Logs Insights queries for these log groups are in docs/deploy.md."
                ),
                width=_WIDE,
                height=2,
            )
        )
        if self._mode == "sync":
            dashboard.add_widgets(
                self._graph("Rounds completed", [search("RoundCompleted", "Sum", "rounds")]),
                self._graph(
                    "Round duration (s)", [search("RoundDurationSeconds", "Maximum", "round duration")]
                ),
                self._graph("Clients reporting per round", [search("ClientsReported", "Maximum", "clients")]),
            )
            dashboard.add_widgets(
                self._graph("Aggregation time (s)", [search("AggregationSeconds", "Maximum", "aggregation")]),
                self._graph("Privacy spent (epsilon)", [search("Epsilon", "Maximum", "epsilon")]),
                self._graph("Model size (bytes)", [search("ModelBytes", "Maximum", "model bytes")]),
            )
        else:
            dashboard.add_widgets(
                self._graph("Updates applied", [search("UpdateApplied", "Sum", "applied")]),
                self._graph(
                    "Staleness (versions)",
                    [
                        search("Staleness", "p50", "p50"),
                        search("Staleness", "p95", "p95"),
                        search("Staleness", "Maximum", "max"),
                    ],
                ),
                self._graph(
                    "Stream wait: record written to batch committed (s)",
                    [search("StreamWaitSeconds", "p50", "p50"), search("StreamWaitSeconds", "p95", "p95")],
                ),
            )
            dashboard.add_widgets(
                self._graph(
                    "Records per batch, and updates buffered (FedBuff)",
                    [search("BatchSize", "Average", "records"), search("BufferFill", "Maximum", "buffered")],
                ),
                self._graph("Version conflicts retried", [search("ConflictRetries", "Sum", "retries")]),
                self._graph("Aggregation time (s)", [search("AggregationSeconds", "Maximum", "aggregation")]),
            )
        dashboard.add_widgets(
            self._graph(
                "Rejected updates by reason",
                [
                    search(
                        constants.REJECTED_METRIC, "Sum", f"${{PROP('Dim.{constants.REJECTED_DIMENSION}')}}"
                    )
                ],
                width=_HALF,
                stacked=True,
            ),
            self._graph(
                "Dead-letter queue depth",
                [
                    queue.metric_approximate_number_of_messages_visible(
                        period=PERIOD, statistic="Maximum", label=name
                    )
                    for name, queue in dead_letter_queues.items()
                ],
                width=_HALF,
            ),
        )
        dashboard.add_widgets(
            self._graph(
                "Function errors", [f.metric_errors(period=PERIOD, label=n) for n, f in functions.items()]
            ),
            self._graph(
                "Function duration (max, ms)",
                [
                    f.metric_duration(period=PERIOD, statistic="Maximum", label=n)
                    for n, f in functions.items()
                ],
            ),
            self._graph(
                "Stream iterator age (max, ms)",
                [
                    cloudwatch.Metric(
                        namespace="AWS/Lambda",
                        metric_name="IteratorAge",
                        dimensions_map={"FunctionName": f.function_name},
                        statistic="Maximum",
                        period=PERIOD,
                        label=n,
                    )
                    for n, f in functions.items()
                    if n != "Finalize"
                ],
            ),
        )
        if state_machine is not None:
            dashboard.add_widgets(
                self._graph(
                    "Runs (state machine executions)",
                    [
                        state_machine.metric_started(period=PERIOD, label="started"),
                        state_machine.metric_succeeded(period=PERIOD, label="succeeded"),
                        state_machine.metric_failed(period=PERIOD, label="failed"),
                        state_machine.metric_timed_out(period=PERIOD, label="timed out"),
                    ],
                    width=_HALF,
                ),
                cloudwatch.AlarmStatusWidget(
                    alarms=list(self.alarms.values()), title="Alarms", width=_HALF, height=_HEIGHT
                ),
            )
        else:
            dashboard.add_widgets(
                cloudwatch.AlarmStatusWidget(
                    alarms=list(self.alarms.values()), title="Alarms", width=_WIDE, height=_HEIGHT
                )
            )
        dashboard.add_widgets(
            cloudwatch.LogQueryWidget(
                title="Rejected updates (latest)",
                log_group_names=[g.log_group_name for g in log_groups],
                query_lines=[
                    "fields @timestamp, reason, run_id, client_id, detail",
                    'filter message = "update rejected"',
                    "sort @timestamp desc",
                    "limit 50",
                ],
                width=_WIDE,
                height=_HEIGHT,
            )
        )
        return dashboard
