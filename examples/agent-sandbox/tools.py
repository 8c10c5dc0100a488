"""The seed's three agent tools against kiln. Only the client construction differs from the
seed's boto3 version: `kiln.client(..., route_endpoints=True)` makes `https://{endpoint}`
resolve to kilnd's ingress in this process and trusts kilnd's CA (kilnd must run with
`--ingress-tls-self-signed --ingress-domain kiln.localhost`; see sdk/python/kiln/ingress.py).

With the Strands Agents SDK installed, the functions are also Strands tools."""

import requests

import kiln

try:
    from strands.tools import tool
except ImportError:  # the demo runs without an LLM: plain functions

    def tool(f):
        return f


IMAGE_NAME = "python-sandbox"

lambda_client = kiln.client("lambda-microvms", route_endpoints=True)


@tool
def create_sandbox(max_idle_seconds: int = 300) -> dict:
    """Create an isolated microVM sandbox for executing code.
    Returns sandbox_id and endpoint URL."""
    response = lambda_client.run_microvm(
        imageIdentifier=IMAGE_NAME,
        idlePolicy={
            "maxIdleDurationSeconds": max_idle_seconds,
            "suspendedDurationSeconds": 1800,
            "autoResumeEnabled": True,
        },
    )
    return {
        "sandbox_id": response["microvmId"],
        "endpoint": f"https://{response['endpoint']}",
    }


@tool
def run_code(sandbox_id: str, endpoint: str, code: str) -> dict:
    """Execute Python code in the isolated sandbox.
    State persists between calls: files and packages carry over."""
    token_response = lambda_client.create_microvm_auth_token(
        microvmIdentifier=sandbox_id,
        expirationInMinutes=5,
        allowedPorts=[{"port": 8080}],
    )
    token = token_response["authToken"]["X-aws-proxy-auth"]

    resp = requests.post(
        f"{endpoint}/execute",
        headers={"X-aws-proxy-auth": token, "X-aws-proxy-port": "8080"},
        json={"code": code, "timeout": 120},
        timeout=300,
    )
    return resp.json()


@tool
def destroy_sandbox(sandbox_id: str) -> str:
    """Terminate the sandbox. All memory, disk, and processes destroyed."""
    lambda_client.terminate_microvm(microvmIdentifier=sandbox_id)
    return "Sandbox terminated. All state destroyed."
