"""Reports over RabbitMQ, as studio-go-runner published them: sealed protojson Reports, text/plain and not
persistent, to StudioML.topic with routing key StudioML.<queue>_response -- and straight to a response queue that
was declared but never bound (as the Go runner's own example consumer did), which the exchange could not reach."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from runner.queues.rabbitmq import EXCHANGE
from tests.integration.conftest import Sandbox
from tests.integration.rabbitmq.conftest import Rabbit, experiment_request
from tests.integration.test_reports import experimenter_keys
from tests.report_proto import as_dict, open_report


def test_reports_reach_bound_and_unbound_response_queues(sandbox: Sandbox, rabbit: Rabbit) -> None:
    keys, private_pem = experimenter_keys(sandbox.root)
    (keys / "rmq_").write_bytes((keys / "local_").read_bytes())
    rabbit.declare_work_queue("rmq_team_a_response")  # bound to StudioML.topic as clients bind queues
    vhost = quote(rabbit.vhost, safe="")
    status, _ = rabbit.node.api("PUT", f"/api/queues/{vhost}/rmq_team_b_response", {"durable": False})
    assert status in (201, 204)  # declared only
    failing, body = experiment_request(sandbox, "fails", "print('about to fail')\nraise SystemExit(4)\n")
    rabbit.publish("rmq_team_a", body)
    working, body = experiment_request(sandbox, "works", "print('all good')\n")
    rabbit.publish("rmq_team_b", body)

    runner = sandbox.start("--limit-tasks", "2", RESPONSE_SIGNATURES_DIR=str(keys), **rabbit.runner_env())
    assert runner.wait(180) == 0, runner.log.read_text()

    def reports(queue: str) -> list[dict[str, Any]]:
        messages = rabbit.messages(queue)
        for message in messages:
            assert message["exchange"] in (EXCHANGE, "")
            assert message["properties"]["content_type"] == "text/plain"
            assert message["properties"]["delivery_mode"] == 1
        return [as_dict(open_report(m["payload"].encode(), private_pem)) for m in messages]

    failed = reports("rmq_team_a_response")
    assert {r["experimentId"] for r in failed} == {failing}
    steps = [r.get("progress", {}).get("state") or r["logging"]["message"] for r in failed]
    assert steps == ["Started", "start", "about to fail", "stop", "Failed"]
    assert rabbit.messages("rmq_team_a_response")[0]["exchange"] == EXCHANGE

    succeeded = reports("rmq_team_b_response")
    steps = [r.get("progress", {}).get("state") or r["logging"]["message"] for r in succeeded]
    assert steps == ["Started", "start", "all good", "stop", "Success"]
    assert {r["experimentId"] for r in succeeded} == {working}
    assert rabbit.ready("rmq_team_a") == 0 and rabbit.ready("rmq_team_b") == 0
