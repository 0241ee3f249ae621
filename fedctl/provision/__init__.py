"""Provisioning: project.yml, the project CA, certificates and signed startup kits.

The CLI (`fedctl provision`, `fedctl cert ...`, `fedctl kit ...`) only wraps these functions;
POC mode calls them with a project built in code (see :func:`poc_project`). Importing this
package is cheap: cryptography and PyYAML are imported when first needed.

Modules, from the bottom up (each imports only those above it):

* ``identity``  who a certificate names (subject encoding); ``certs`` keys, CA, certificates
* ``schema``    project.yml keys, limits and checks; ``project`` its dataclasses and loading
* ``policy``    the site policy files in a kit's ``local/``
* ``kitspec``   a kit's layout and error type; ``kitfiles`` building and writing kits;
  ``kit``       loading and verifying kits (what the runtime uses)
* ``workspace`` the workspace's state, lock and issued certificates
* ``csr``       site-held keys: request, sign, assemble
* ``provisioner`` provision, re-provision, add a site or admin (``example``: the example file)
"""

from fedctl.provision.csr import (
    CertRequest,
    SignedRequest,
    assemble_kit,
    request_certificate,
    sign_csr,
)
from fedctl.provision.identity import PARTICIPANT_TYPES, ROLES, Identity, IdentityError
from fedctl.provision.kit import Kit, KitError, load_kit, verify_kit
from fedctl.provision.policy import (
    DEFAULT_AUTHORIZATION,
    AuthorizationPolicy,
    Rights,
    default_authorization,
    load_authorization,
)
from fedctl.provision.project import (
    Admin,
    Project,
    ProjectError,
    Server,
    Site,
    load_project,
    parse_project,
    poc_project,
)
from fedctl.provision.provisioner import (
    ProvisionResult,
    add_admin,
    add_participant,
    add_site,
    example_project_yaml,
    provision,
    write_example,
)
from fedctl.provision.workspace import KitRecord

__all__ = [
    "DEFAULT_AUTHORIZATION",
    "PARTICIPANT_TYPES",
    "ROLES",
    "Admin",
    "AuthorizationPolicy",
    "CertRequest",
    "Identity",
    "IdentityError",
    "Kit",
    "KitError",
    "KitRecord",
    "Project",
    "ProjectError",
    "ProvisionResult",
    "Rights",
    "Server",
    "SignedRequest",
    "Site",
    "add_admin",
    "add_participant",
    "add_site",
    "assemble_kit",
    "default_authorization",
    "example_project_yaml",
    "load_authorization",
    "load_kit",
    "load_project",
    "parse_project",
    "poc_project",
    "provision",
    "request_certificate",
    "sign_csr",
    "verify_kit",
    "write_example",
]
