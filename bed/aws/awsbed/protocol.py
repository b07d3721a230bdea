"""Just enough of the AWS wire protocols to observe calls and answer a few of them.

Clients sign every request with SigV4, so the credential scope in the ``Authorization`` header names
the service and region. Query-protocol services (Auto Scaling, EC2) send a form-encoded body
``Action=SetDesiredCapacity&AutoScalingGroupName=...``; JSON-protocol services name the action in
``X-Amz-Target``. Everything else is a REST call, identified here by method and path only.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

AUTOSCALING_XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# Action-name prefixes of calls that never change anything.
READ_ONLY_PREFIXES = ("Describe", "Get", "List")


@dataclass(frozen=True)
class AwsRequest:
    """What the bed needs to know about one AWS API request."""

    method: str
    path: str
    service: str | None
    region: str | None
    protocol: str  # "query", "json" or "rest"
    action: str | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_aws_call(self) -> bool:
        """True for a signed request or one that names an action (moto's own /moto-api is neither)."""
        return self.service is not None or self.action is not None

    @property
    def is_read_only(self) -> bool:
        return self.action is not None and self.action.startswith(READ_ONLY_PREFIXES)

    @property
    def asg_name(self) -> str | None:
        return self.params.get("AutoScalingGroupName")

    @property
    def desired_capacity(self) -> int | None:
        return parse_int(self.params.get("DesiredCapacity"))

    def list_param(self, name: str) -> list[str]:
        """The members of a Query-protocol list, ``Name.member.1``, ``Name.member.2``, ... in order."""
        prefix = f"{name}.member."
        indexed = []
        for key, value in self.params.items():
            if key.startswith(prefix) and key[len(prefix) :].isdigit():
                indexed.append((int(key[len(prefix) :]), value))
        return [value for _, value in sorted(indexed)]

    def label(self) -> str:
        """A name for the call in logs: the action, or method and path for REST calls."""
        return self.action or f"{self.method} {self.path}"


def parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def read_body(environ: dict[str, Any]) -> bytes:
    """Read the request body and put an identical stream back, so the next app can read it too."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def credential_scope(environ: dict[str, Any]) -> tuple[str | None, str | None]:
    """(region, service) from a SigV4 ``Authorization`` header, or (None, None) if unsigned."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    marker = "Credential="
    start = auth.find(marker)
    if start < 0:
        return None, None
    credential = auth[start + len(marker) :].split(",", 1)[0].strip()
    parts = credential.split("/")
    # access-key/date/region/service/aws4_request
    if len(parts) != 5:
        return None, None
    return parts[2], parts[3].lower()


def parse_aws_request(environ: dict[str, Any], body: bytes) -> AwsRequest:
    """Describe a request from its WSGI environ and already-read body."""
    region, service = credential_scope(environ)
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return AwsRequest(method, path, service, region, "json", target.rsplit(".", 1)[-1])

    params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
    if environ.get("CONTENT_TYPE", "").startswith(FORM_CONTENT_TYPE) and body:
        params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    action = params.get("Action")
    protocol = "query" if action else "rest"
    return AwsRequest(method, path, service, region, protocol, action, params)


def new_request_id() -> str:
    return str(uuid.uuid4())


def iso_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds, as AWS writes it: ``2026-11-25T17:00:00.123Z``."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def xml_element(name: str, text: str | int | None) -> str:
    """``<name>text</name>``, or nothing when there is no value."""
    if text is None:
        return ""
    return f"<{name}>{escape(str(text))}</{name}>"


@dataclass(frozen=True)
class ErrorReply:
    """An AWS error, in the terms of each protocol family the bed may have to answer in."""

    status: int
    code: str
    message: str
    sender_fault: bool
    ec2_code: str
    json_type: str

    def render(self, request: AwsRequest, request_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """(HTTP status, headers, body) for this error, in the protocol of ``request``."""
        if request.protocol == "json":
            body = json.dumps({"__type": self.json_type, "message": self.message}).encode()
            content_type = "application/x-amz-json-1.1"
        elif request.service == "ec2":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                f"{xml_element('Code', self.ec2_code)}{xml_element('Message', self.message)}"
                f"</Error></Errors>{xml_element('RequestID', request_id)}</Response>"
            ).encode()
            content_type = "text/xml"
        else:
            xmlns = f' xmlns="{AUTOSCALING_XMLNS}"' if request.service in (None, "autoscaling") else ""
            body = (
                f"<ErrorResponse{xmlns}><Error>"
                f"{xml_element('Type', 'Sender' if self.sender_fault else 'Receiver')}"
                f"{xml_element('Code', self.code)}{xml_element('Message', self.message)}"
                f"</Error>{xml_element('RequestId', request_id)}</ErrorResponse>"
            ).encode()
            content_type = "text/xml"
        return self.status, response_headers(content_type, body, request_id), body


THROTTLING = ErrorReply(
    status=400,
    code="Throttling",
    message="Rate exceeded",
    sender_fault=True,
    ec2_code="RequestLimitExceeded",
    json_type="ThrottlingException",
)

INTERNAL_FAILURE = ErrorReply(
    status=500,
    code="InternalFailure",
    message="We encountered an internal error. Please try again.",
    sender_fault=False,
    ec2_code="InternalError",
    json_type="InternalFailure",
)

# What AWS answers a caller whose role lacks the permission; it names the account and the role,
# which is why the controller keeps such texts out of Events.
ACCESS_DENIED = ErrorReply(
    status=403,
    code="AccessDenied",
    message="User: arn:aws:sts::123456789012:assumed-role/spot-rebalancer/controller is not authorized "
    "to perform: autoscaling:SetDesiredCapacity because no identity-based policy allows the action",
    sender_fault=True,
    ec2_code="UnauthorizedOperation",
    json_type="AccessDeniedException",
)


def validation_error(message: str) -> ErrorReply:
    return ErrorReply(400, "ValidationError", message, True, "InvalidParameterValue", "ValidationException")


def response_headers(content_type: str, body: bytes, request_id: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("x-amzn-RequestId", request_id),
    ]
