"""The CTI keys of the configuration: defaults, validation messages, cross-references."""

from __future__ import annotations

import pytest

from softswitch.config import ConfigError, load_config, parse_config

BASE = '[[users]]\nname = "1001"\npassword = "p"\n'


def test_defaults() -> None:
    config = load_config(None, env={})
    assert config.cti.not_ready_reasons == ["busy", "break", "lunch", "meeting", "training"]
    assert config.cti.default_not_ready_reason == "busy" and config.cti.no_answer_not_ready
    agent, queue = config.agents[0], config.queues[0]
    assert (agent.skills, agent.auto_answer, agent.initial_state, agent.team) == ({}, False, "ready", [])
    assert (queue.max_length, queue.overflow, queue.no_agents, queue.skills) == (0, None, None, {})
    assert (queue.priority, queue.wrap_up_s, queue.service_level_s) == (0, None, 20)


def test_full_cti_configuration_parses() -> None:
    text = BASE + (
        '[cti]\nnot_ready_reasons = ["break", "training"]\ndefault_not_ready_reason = "break"\n'
        "no_answer_not_ready = false\n"
        '[[queues]]\nid = "vip"\nstrategy = "skills"\nskills = { english = 3 }\npriority = 9\n'
        'max_length = 5\noverflow = "9000"\nno_agents = "9100"\nwrap_up_s = 0\nservice_level_s = 15\n'
        '[[agents]]\nid = "8001"\npassword = "p"\nextension = "1001"\nqueues = ["vip"]\n'
        'skills = { english = 5 }\nauto_answer = true\ninitial_state = "not_ready"\n'
        '[[agents]]\nid = "9001"\npassword = "p"\nrole = "supervisor"\nteam = ["8001"]\n'
    )
    config = parse_config(text, "t.toml", env={})
    assert config.queues[0].skills == {"english": 3} and config.agents[0].auto_answer
    assert config.agents[1].team == ["8001"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[cti]\nnot_ready_reasons = ["Coffee Break"]\ndefault_not_ready_reason = "x"\n',
            "t.toml:5: cti.not_ready_reasons: reasons are lowercase",
        ),
        (
            '[cti]\nnot_ready_reasons = ["no_answer"]\n',
            "cti.not_ready_reasons: 'no_answer' is a reason the system gives",
        ),
        (
            '[cti]\nnot_ready_reasons = ["a", "a"]\ndefault_not_ready_reason = "a"\n',
            "a reason is listed twice",
        ),
        (
            '[cti]\nnot_ready_reasons = ["break"]\n',
            "cti: default_not_ready_reason 'busy' is not in not_ready_reasons",
        ),
        ("[cti]\nnot_ready_reasons = []\n", "cti.not_ready_reasons: List should have at least 1 item"),
        (
            '[[queues]]\nid = "q"\noverflow = "a b"\n',
            "queues[0].overflow: expected a number the dialplan routes",
        ),
        ('[[queues]]\nid = "q"\nstrategy = "skills"\n', 'queues[0]: strategy "skills" needs the skills'),
        (
            '[[queues]]\nid = "q"\nskills = { english = 0 }\n',
            "queues[0].skills: skill 'english': level must be 1-100",
        ),
        ('[[queues]]\nid = "q"\nskills = { English = 1 }\n', "queues[0].skills: skill names are lowercase"),
        (
            '[[queues]]\nid = "q"\nmax_length = -1\n',
            "queues[0].max_length: Input should be greater than or equal to 0",
        ),
        (
            '[[agents]]\nid = "8001"\npassword = "p"\nteam = ["8002"]\n',
            "agents[0]: team: only a supervisor has a team",
        ),
        (
            '[[agents]]\nid = "8001"\npassword = "p"\ninitial_state = "busy"\n',
            "agents[0].initial_state: Input should be",
        ),
        (
            '[[agents]]\nid = "9001"\npassword = "p"\nrole = "supervisor"\nteam = ["8009"]\n',
            "t.toml:8: agents[0].team[0]: no agent '8009' in [[agents]]",
        ),
    ],
)
def test_precise_messages(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(BASE + text, "t.toml", env={})
    assert any(expected in problem for problem in error.value.problems), error.value.problems
