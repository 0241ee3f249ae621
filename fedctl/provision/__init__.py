"""Provisioning: project.yml, the project CA, certificates and signed startup kits.

The CLI (`fedctl provision`, `fedctl cert ...`, `fedctl kit ...`) only wraps these functions;
POC mode calls them with a project built in code (see :func:`poc_project`). Importing this
package is cheap: cryptography and PyYAML are imported when first needed.
"""

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
    CertRequest,
    KitRecord,
    ProvisionResult,
    SignedRequest,
    add_admin,
    add_participant,
    add_site,
    assemble_kit,
    example_project_yaml,
    provision,
    request_certificate,
    sign_csr,
    write_example,
)

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
