"""An independent HTTP Signatures peer for stampede's interop tests.

Signs requests with other people's libraries (httpsig for draft-cavage,
http-message-signatures for RFC 9421) so stampede must verify them, and
verifies stampede's signatures with httpsig. JSON in, JSON out.

  peer.py sign ALG        ALG: cavage-rsa-sha256 | rsa-v1_5-sha256 | rsa-pss-sha512 | ed25519
  peer.py verify-cavage   reads {public_key_pem, method, path, host, headers} on stdin
  peer.py verify-rfc9421  reads {public_key_pem, method, path, host, headers, body (base64)} on stdin
"""
import base64
import email.utils
import hashlib
import json
import sys

import httpsig
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from http_message_signatures import HTTPMessageSigner, HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms

HOST = "stampede.example"
PATH = "/users/alice/inbox"
KEY_ID = "https://peer.example/users/p#main-key"
BODY = b'{"type":"Create","id":"https://peer.example/activities/1","actor":"https://peer.example/users/p"}'


def public_pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(alg):
    date = email.utils.formatdate(usegmt=True)
    if alg == "cavage-rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        secret = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        headers = {
            "Host": HOST,
            "Date": date,
            "Digest": "SHA-256=" + base64.b64encode(hashlib.sha256(BODY).digest()).decode(),
            "Content-Type": "application/activity+json",
        }
        signer = httpsig.HeaderSigner(
            KEY_ID, secret, algorithm="rsa-sha256",
            headers=["(request-target)", "host", "date", "digest"], sign_header="signature",
        )
        signed = signer.sign(headers, host=HOST, method="POST", path=PATH)
        return public_pem(key), list(signed.items())
    key = ed25519.Ed25519PrivateKey.generate() if alg == "ed25519" else rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    )

    class Keys(HTTPSignatureKeyResolver):
        def resolve_private_key(self, key_id):
            return key

        def resolve_public_key(self, key_id):
            return key.public_key()

    algo = {
        "rsa-v1_5-sha256": algorithms.RSA_V1_5_SHA256,
        "rsa-pss-sha512": algorithms.RSA_PSS_SHA512,
        "ed25519": algorithms.ED25519,
    }[alg]
    req = requests.Request(
        "POST", f"https://{HOST}{PATH}", data=BODY,
        headers={
            "Content-Type": "application/activity+json",
            "Date": date,
            "Content-Digest": "sha-256=:" + base64.b64encode(hashlib.sha256(BODY).digest()).decode() + ":",
        },
    ).prepare()
    HTTPMessageSigner(signature_algorithm=algo, key_resolver=Keys()).sign(
        req, key_id=KEY_ID, label="sig1", use_existing_digest=True,
        covered_component_ids=("@method", "@target-uri", "content-digest", "date"),
    )
    return public_pem(key), [("Host", HOST)] + list(req.headers.items())


def main():
    cmd = sys.argv[1]
    if cmd == "sign":
        pem, headers = sign(sys.argv[2])
        json.dump({
            "public_key_pem": pem, "method": "POST", "path": PATH,
            "headers": [[k, v] for k, v in headers],
            "body": base64.b64encode(BODY).decode(),
        }, sys.stdout)
    elif cmd == "verify-cavage":
        req = json.load(sys.stdin)
        headers = {k: v for k, v in req["headers"]}
        ok = httpsig.HeaderVerifier(
            headers, req["public_key_pem"],
            required_headers=["(request-target)", "host", "date", "digest"],
            method=req["method"], path=req["path"], host=req["host"], sign_header="signature",
        ).verify()
        json.dump({"verified": bool(ok)}, sys.stdout)
    elif cmd == "verify-rfc9421":
        req = json.load(sys.stdin)
        pem = req["public_key_pem"]

        class Keys(HTTPSignatureKeyResolver):
            def resolve_public_key(self, key_id):
                return serialization.load_pem_public_key(pem.encode())

            def resolve_private_key(self, key_id):
                raise NotImplementedError

        body = base64.b64decode(req["body"])
        msg = requests.Request(
            req["method"], f"https://{req['host']}{req['path']}", headers=dict(req["headers"]), data=body or None,
        ).prepare()
        try:
            results = HTTPMessageVerifier(signature_algorithm=algorithms.RSA_V1_5_SHA256, key_resolver=Keys()).verify(
                msg, require_components=["@method", "@target-uri"], body=body,
            )
            json.dump({"verified": True, "covered": [str(c) for c in results[0].covered_components]}, sys.stdout)
        except Exception as e:
            json.dump({"verified": False, "error": f"{type(e).__name__}: {e}"}, sys.stdout)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
