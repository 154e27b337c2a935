# -*- test-case-name: tests.test_s3 -*-
"""
S3-compatible object stores as origins: C{--origin=s3://BUCKET/PREFIX} with C{--s3-endpoint}.

Requests are the edge's usual ranged and conditional GETs (and HEADs), sent path-style to
C{ENDPOINT/BUCKET/PREFIX/PATH} and signed with AWS Signature Version 4 by botocore's own signer
(C{botocore.auth.S3SigV4Auth}); nothing of SigV4 is written here.  Credentials come, in this
order, from the file given with C{--s3-credentials} (AWS shared-credentials format), from the
C{AWS_ACCESS_KEY_ID}/C{AWS_SECRET_ACCESS_KEY} (and C{AWS_SESSION_TOKEN}) environment variables,
or from C{~/.aws/credentials} (C{AWS_SHARED_CREDENTIALS_FILE} moves it; C{AWS_PROFILE} or
C{--s3-profile} picks the profile).  Only these providers are asked: botocore's full chain would
also query the instance-metadata address, which an edge must not do behind the operator's back.

The query string of a viewer's request is not sent (an object store's keys have none).  An answer
saying the signature or key was refused (C{SignatureDoesNotMatch}, C{InvalidAccessKeyId}, ...) is an
origin failure, logged as such, never the object's answer: the viewer gets 502, nothing is cached.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import quote

from attrs import frozen

S3_AUTH_ERRORS = frozenset({
    "SignatureDoesNotMatch", "InvalidAccessKeyId", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "MissingSecurityHeader", "InvalidSecurity",
    "AccessDenied",
})

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class S3ConfigError(ValueError):
    """An s3:// origin, its endpoint or its credentials are unusable (a usage error at startup)."""


@frozen
class S3Location:
    bucket: str
    prefix: str  # "" or ending with "/"

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        """C{s3://BUCKET[/PREFIX]}."""
        if not url.startswith("s3://"):
            raise S3ConfigError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise S3ConfigError(f"{bucket!r} is not an S3 bucket name")
        prefix = prefix.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")

    @property
    def base(self) -> str:
        """The origin's name in logs and health state: C{s3://BUCKET/PREFIX/}."""
        return f"s3://{self.bucket}/{self.prefix}"


def load_credentials(credentials_file: Optional[str] = None, profile: Optional[str] = None) -> Any:
    """
    botocore credentials from C{credentials_file}, the environment, or C{~/.aws/credentials}.

    @raise S3ConfigError: none of them has any.
    """
    from botocore.credentials import CredentialResolver, EnvProvider, SharedCredentialProvider

    profile = profile or os.environ.get("AWS_PROFILE") or "default"
    providers: list[Any] = []
    if credentials_file:
        if not os.path.isfile(credentials_file):
            raise S3ConfigError(f"--s3-credentials={credentials_file!r}: no such file")
        providers.append(SharedCredentialProvider(creds_filename=credentials_file, profile_name=profile))
    providers.append(EnvProvider())
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    providers.append(SharedCredentialProvider(creds_filename=shared, profile_name=profile))
    try:
        credentials = CredentialResolver(providers).load_credentials()
    except Exception as e:  # botocore's parse errors of a bad file
        raise S3ConfigError(f"reading S3 credentials: {e}") from None
    if credentials is None:
        raise S3ConfigError(
            "no S3 credentials: give --s3-credentials=FILE, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or write profile {profile!r} in ~/.aws/credentials")
    return credentials


class S3Origin:
    """One bucket (and prefix) on an S3-compatible endpoint: URLs and signed headers for the origin client."""

    def __init__(self, location: S3Location, endpoint: str, region: str, credentials: Any) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise S3ConfigError(f"--s3-endpoint={endpoint!r} must be an http:// or https:// URL")
        from botocore.auth import S3SigV4Auth

        self.location = location
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self._auth = S3SigV4Auth(credentials, "s3", region)

    @property
    def base(self) -> str:
        return self.location.base

    def url_for(self, path: str) -> str:
        """The object URL of edge path C{path} (normalised, percent-encoded, starting with C{/}); no query."""
        key_path = path.partition("?")[0].lstrip("/")
        return f"{self.endpoint}/{self.location.bucket}/{quote(self.location.prefix)}{key_path}"

    def sign(self, method: str, url: str, headers: dict[str, str], body: bytes = b"") -> dict[str, str]:
        """C{headers} plus the SigV4 ones (Authorization, X-Amz-Date, X-Amz-Content-SHA256) for this request."""
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
        self._auth.add_auth(request)
        return {name: value.decode("latin-1") if isinstance(value, bytes) else value
                for name, value in request.headers.items()}


def error_code(body: bytes) -> Optional[str]:
    """The C{<Code>} of an S3 error document, if C{body} has one."""
    match = _ERROR_CODE.search(body[:65536])
    return match.group(1).decode("ascii") if match else None
