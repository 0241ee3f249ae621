"""project.yml: the schema's validation messages, the in-code form, the example file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedctl.cli.main import main
from fedctl.errors import ConfigError, NotFound
from fedctl.provision import (
    Admin,
    Project,
    ProjectError,
    Server,
    Site,
    example_project_yaml,
    load_project,
    parse_project,
    poc_project,
)

ROOT = Path(__file__).resolve().parents[1]

GOOD_SERVER = "server: {name: fl.example.org}\n"

# (id, yaml text, expected message after "<file>:")
INVALID = [
    (
        "missing-server",
        "name: demo\nparticipants: []\n",
        "1: server: missing (every project has one server)",
    ),
    (
        "duplicate-name",
        "name: demo\n" + GOOD_SERVER + "participants:\n"
        "  - {type: site, name: site-1, org: a}\n"
        "  - {type: site, name: site-2, org: a}\n"
        "  - {type: site, name: site-3, org: a}\n"
        "  - {type: site, name: site-2, org: b}\n",
        "7: participants[3].name: duplicate name 'site-2' (first used at participants[1].name)",
    ),
    (
        "duplicate-name-case-insensitive",
        "name: demo\n" + GOOD_SERVER + "participants:\n"
        "  - {type: site, name: Site-1, org: a}\n"
        "  - {type: site, name: site-1, org: a}\n",
        "5: participants[1].name: duplicate name 'site-1' (first used at participants[0].name)",
    ),
    (
        "name-equals-server",
        "name: demo\n"
        + GOOD_SERVER
        + "participants:\n  - {type: site, name: fl.example.org, org: a}\n",
        "4: participants[0].name: duplicate name 'fl.example.org' (first used at server.name)",
    ),
    (
        "bad-role",
        "name: demo\n" + GOOD_SERVER + "participants:\n"
        "  - type: admin\n"
        "    name: bob@example.org\n"
        "    org: example\n"
        "    role: owner\n",
        "7: participants[0].role: must be one of project_admin, org_admin, lead, member, "
        "got 'owner'",
    ),
    (
        "missing-role",
        "name: demo\n" + GOOD_SERVER + "participants:\n  - {type: admin, name: a@b.org, org: x}\n",
        "4: participants[0].role: missing (one of project_admin, org_admin, lead, member)",
    ),
    (
        "bad-port",
        "name: demo\nserver:\n  name: fl.example.org\n  port: 70000\n",
        "4: server.port: must be 1-65535, got 70000",
    ),
    (
        "port-as-string",
        "name: demo\nserver:\n  name: fl.example.org\n  port: '8002'\n",
        "4: server.port: must be an integer 1-65535, got '8002'",
    ),
    (
        "unknown-top-level-key",
        "name: demo\nservr: {name: fl.example.org}\n",
        "2: servr: unknown key (did you mean 'server'? expected one of: api_version, name, "
        "description, ca_valid_days, cert_valid_days, key_type, server, participants, "
        "homomorphic_encryption)",
    ),
    (
        "unknown-participant-key",
        "name: demo\n"
        + GOOD_SERVER
        + "participants:\n  - {type: admin, name: a@b.org, org: x, rol: lead}\n",
        "4: participants[0].rol: unknown key (did you mean 'role'? expected one of: type, name, "
        "org, role)",
    ),
    (
        "empty-file",
        "",
        " empty file (expected a project: see `fedctl provision --init`)",
    ),
    (
        "comments-only",
        "# nothing here yet\n\n",
        " empty file (expected a project: see `fedctl provision --init`)",
    ),
    (
        "yaml-syntax-error",
        "name: demo\nserver:\n  name: fl.example.org\n   port: 8002\n",
        "4: YAML syntax error: mapping values are not allowed here (column 8)",
    ),
    (
        "duplicate-yaml-key",
        "name: demo\n" + GOOD_SERVER + "name: other\n",
        "3: name: duplicate key (first on line 1)",
    ),
    (
        "top-level-list",
        "- name: demo\n",
        "1: the top level must be a mapping of project keys, got a list",
    ),
    (
        "missing-name",
        GOOD_SERVER,
        "1: name: missing (the project's name)",
    ),
    (
        "bad-project-name",
        "name: my project\n" + GOOD_SERVER,
        "1: name: must be 1-48 letters, digits, '.', '_' or '-', starting with a letter or digit,"
        " got 'my project'",
    ),
    (
        "site-with-role",
        "name: demo\n"
        + GOOD_SERVER
        + "participants:\n  - {type: site, name: s1, org: a, role: lead}\n",
        "4: participants[0].role: only admins have a role",
    ),
    (
        "admin-not-email",
        "name: demo\n"
        + GOOD_SERVER
        + "participants:\n  - {type: admin, name: bob, org: a, role: lead}\n",
        "4: participants[0].name: admins are named by e-mail address (at most 64 characters), "
        "got 'bob'",
    ),
    (
        "server-in-participants",
        "name: demo\n" + GOOD_SERVER + "participants:\n  - {type: server, name: s, org: a}\n",
        "4: participants[0].type: must be 'site' or 'admin', got 'server' (the server has its "
        "own 'server' section)",
    ),
    (
        "bad-host-name",
        "name: demo\nserver:\n  name: fl.example.org\n  host_names: [10.0.0.5, 'bad host']\n",
        "4: server.host_names[1]: must be a DNS name or IP address, got 'bad host'",
    ),
    (
        "cert-outlives-ca",
        "name: demo\nca_valid_days: 100\ncert_valid_days: 365\n" + GOOD_SERVER,
        "3: cert_valid_days: must not exceed ca_valid_days (100), got 365",
    ),
    (
        "participants-not-a-list",
        "name: demo\n" + GOOD_SERVER + "participants: {type: site}\n",
        "3: participants: must be a list, got a mapping",
    ),
    (
        "bad-resources",
        "name: demo\n" + GOOD_SERVER + "participants:\n"
        "  - type: site\n"
        "    name: s1\n"
        "    org: a\n"
        "    resources: {gpus: [0, -1]}\n",
        "7: participants[0].resources.gpus[1]: must be 0-1023, got -1",
    ),
    (
        "api-version",
        "api_version: 2\nname: demo\n" + GOOD_SERVER,
        "1: api_version: unsupported version 2 (this fedctl reads 1)",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID]
)
def test_invalid_project_exact_message_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    yml = tmp_path / "project.yml"
    yml.write_text(text)
    ws = tmp_path / "ws"
    rc = main(["provision", str(yml), "-o", str(ws)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: {yml}:{expected}\n"
    assert not ws.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.yml"]


def test_invalid_project_into_existing_empty_folder_leaves_it_empty(tmp_path: Path) -> None:
    yml = tmp_path / "project.yml"
    yml.write_text("name: demo\nserver: {name: fl.example.org, port: 0}\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(ProjectError):
        from fedctl.provision import provision

        provision(yml, ws)
    assert list(ws.iterdir()) == []


def test_from_dict_messages_have_no_file_prefix() -> None:
    with pytest.raises(ProjectError) as info:
        Project.from_dict(
            {
                "name": "demo",
                "server": {"name": "localhost"},
                "participants": [
                    {"type": "site", "name": "site-1", "org": "a"},
                    {"type": "site", "name": "site-2", "org": "a"},
                    {"type": "site", "name": "site-3", "org": "a"},
                    {"type": "site", "name": "site-2", "org": "a"},
                ],
            }
        )
    assert str(info.value) == (
        "participants[3].name: duplicate name 'site-2' (first used at participants[1].name)"
    )
    assert info.value.key == "participants[3].name"
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ProjectError, match=r"^server\.port: must be 1-65535, got 70000$"):
        Project.from_dict({"name": "demo", "server": {"name": "localhost", "port": 70000}})


def test_dataclasses_validate_too() -> None:
    with pytest.raises(ProjectError, match=r"^participants\[1\]\.role: must be one of"):
        Project(
            name="demo",
            server=Server(name="localhost"),
            participants=(Site("s1", "a"), Admin("x@y.org", "a", role="boss")),
        )
    with pytest.raises(ProjectError, match=r"^server\.name: must be a DNS name"):
        Project(name="demo", server=Server(name="not a host"))


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"nope\.yml: no such file$"):  # exit 4
        load_project(tmp_path / "nope.yml")
    with pytest.raises(ProjectError, match=r": is a folder, expected a project.yml file$"):
        load_project(tmp_path)


def test_example_loads_and_matches_packaged_copy() -> None:
    text = (ROOT / "provisioning" / "example.yml").read_text()
    assert text == example_project_yaml()
    project = load_project(ROOT / "provisioning" / "example.yml")
    assert project.name == "example-project"
    assert project.server.port == 8002
    assert [s.name for s in project.sites] == ["hospital-a", "hospital-b", "hospital-c"]
    assert [(a.name, a.role) for a in project.admins] == [
        ("admin@example.org", "project_admin"),
        ("researcher@hospital-a.org", "lead"),
    ]
    assert project.sites[0].resources == {"max_concurrent_jobs": 2, "gpus": [0, 1]}
    assert project.sites[0].labels == {"region": "eu-west"}


def test_round_trip_through_yaml() -> None:
    project = load_project(ROOT / "provisioning" / "example.yml")
    again = parse_project(project.to_yaml())
    assert again == project
    assert Project.from_dict(project.to_dict()) == project


def test_poc_project_shape() -> None:
    p = poc_project(3, port=9100)
    assert p.server.name == "localhost"
    assert p.server.host_names == ("127.0.0.1",)
    assert p.server.listen_host == "127.0.0.1"
    assert p.server.port == 9100
    assert [s.name for s in p.sites] == ["site-1", "site-2", "site-3"]
    assert sorted(a.role for a in p.admins) == ["lead", "member", "org_admin", "project_admin"]
    assert poc_project(["a", "b"]).participant("B") is not None


def test_init_writes_example_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "project.yml"
    assert main(["provision", "--init", str(target)]) == 0
    assert target.read_text() == example_project_yaml()
    capsys.readouterr()
    assert main(["provision", "--init", str(target)]) == 2
    assert "already exists; not overwriting" in capsys.readouterr().err
    assert main(["provision", "--init", str(target), "--force"]) == 0


# --------------------------------------------------------------------------- hostile YAML

#: 9 levels of 9 aliases under a valid-looking project: ~387 million strings if expanded
ALIAS_BOMB = (
    "name: demo\nserver: {name: fl.example.org}\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)

HOSTILE = [
    ("alias-bomb", ALIAS_BOMB, "3: YAML anchors and aliases are not allowed (found anchor '&a')"),
    (
        "recursive-alias",
        "name: demo\nserver: {name: fl.example.org}\na: &a [*a]\n",
        "3: YAML anchors and aliases are not allowed (found anchor '&a')",
    ),
    (
        "alias-to-a-participant",
        "name: demo\nserver: {name: fl.example.org}\nparticipants:\n"
        "  - &s {type: site, name: s1, org: a}\n  - *s\n",
        "4: YAML anchors and aliases are not allowed (found anchor '&s')",
    ),
    (
        "deep-nesting",
        "name: demo\nserver: {name: fl.example.org}\ndescription: " + "[" * 5000 + "\n",
        "3: nested more than 64 levels deep",
    ),
    (
        "bad-date",
        "name: demo\nserver: {name: fl.example.org}\ndescription: 2024-13-45\n",
        "3: invalid value: month must be in 1..12",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_yaml_is_refused_fast_in_one_line_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    import time

    yml = tmp_path / "project.yml"
    yml.write_text(text)
    ws = tmp_path / "ws"
    start = time.monotonic()
    rc = main(["provision", str(yml), "-o", str(ws)])
    assert time.monotonic() - start < 5  # catches a hang; not a speed requirement
    assert rc == 2
    assert capsys.readouterr().err == f"error: {yml}:{expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.yml"]


def test_alias_bomb_is_a_few_hundred_bytes() -> None:
    assert len(ALIAS_BOMB.encode()) < 400


def test_too_large_project_file(tmp_path: Path) -> None:
    yml = tmp_path / "project.yml"
    yml.write_text("name: demo\n" + "#" * (1 << 20))
    with pytest.raises(
        ProjectError, match=r"project\.yml: too large \(1048587 bytes, limit 1 MiB\)$"
    ):
        load_project(yml)


def test_shared_objects_are_written_without_aliases() -> None:
    """to_yaml never writes anchors: what fedctl writes (state/project.yml) it can read back."""
    gpus = [0, 1]
    project = Project(
        name="demo",
        server=Server(name="localhost"),
        participants=(
            Site("s1", "a", resources={"gpus": gpus}),
            Site("s2", "a", resources={"gpus": gpus}),
        ),
    )
    text = project.to_yaml()
    assert "&" not in text and "*" not in text
    assert parse_project(text) == project
