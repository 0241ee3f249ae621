"""The example project.yml that `fedctl provision --init` writes.

Kept identical to provisioning/example.yml (a test checks it).
"""

EXAMPLE_PROJECT_YAML = """\
# fedctl project file: one server, three hospitals, two admins.
#
#   fedctl provision provisioning/example.yml -o workspace
#
# creates the project's CA and one startup kit (a folder and a zip) per participant under
# workspace/kits/. Hand each participant its zip; keep workspace/state/ private (it holds the
# CA key). Every key is documented in docs/provisioning.md; unknown keys are errors.

api_version: 1
name: example-project            # letters, digits, '.', '_', '-'
description: Three hospitals train a shared model.

# Certificate lifetimes in days. The CA must outlive the certificates it signs.
ca_valid_days: 3650
cert_valid_days: 365
# key_type: ecdsa-p256           # or ecdsa-p384, rsa-3072

server:
  name: fl.example.org           # the DNS name sites and admins connect to (certificate CN)
  host_names: [fl-internal.example.org, 10.0.0.5]   # other names/IPs it is reached by (SANs)
  port: 8002                     # one port for sites and admins
  org: example-org               # defaults to the project name
  # listen_host: 0.0.0.0         # address the server binds

participants:
  - type: site
    name: hospital-a             # letters, digits, '.', '_', '-'; also the kit's folder name
    org: hospital-a
    resources:                   # seeds local/resources.yaml (the site can edit it later)
      max_concurrent_jobs: 2
      gpus: [0, 1]
    labels: {region: eu-west}    # free-form tags, written into the kit
  - type: site
    name: hospital-b
    org: hospital-b
  - type: site
    name: hospital-c
    org: hospital-c

  # Admins are named by e-mail; role is one of project_admin, org_admin, lead, member.
  - type: admin
    name: admin@example.org
    org: example-org
    role: project_admin
  - type: admin
    name: researcher@hospital-a.org
    org: hospital-a
    role: lead
"""
