"""Checks the signed requests a sink recorded with implementations stampede
did not write: httpsig (draft-cavage) and http-message-signatures (RFC 9421).

  check_recorded.py FILE [--require-tag TAG]

FILE holds one JSON object per line, as `stampede sink --record` (the sink's
`SinkOptions::record`) writes them: server, method, scheme, path, headers
(lower-case names, in order), body (base64), status. Every signed request is
checked: its key is fetched from its keyId (an unsigned GET of the actor
document, as a remote server would), its signature verified, and its body
digest (`Digest` or `Content-Digest`) recomputed here. Prints a JSON list,
one object per signed request: line, method, path, status, style, key_id,
covered, label, tag, ok, error.
"""
import base64
import hashlib
import json
import re
import sys

import httpsig
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms

KEYS = {}


def public_pem(key_id):
    if key_id not in KEYS:
        url = key_id.split("#", 1)[0]
        doc = requests.get(url, headers={"accept": "application/activity+json"}, timeout=10).json()
        key = doc.get("publicKey") or {}
        if key.get("id") != key_id:
            raise ValueError(f"{url} does not publish the key {key_id}")
        KEYS[key_id] = key["publicKeyPem"]
    return KEYS[key_id]


def check_cavage(rec, headers, body):
    sig = headers["signature"]
    key_id = re.search(r'keyId="([^"]*)"', sig).group(1)
    covered = re.search(r'headers="([^"]*)"', sig).group(1).split()
    required = ["(request-target)", "host", "date"]
    if rec["method"] == "POST":
        required.append("digest")
        want = "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()
        if headers.get("digest") != want:
            raise ValueError(f"digest {headers.get('digest')!r} is not the body's {want!r}")
    ok = httpsig.HeaderVerifier(
        headers, public_pem(key_id), required_headers=required,
        method=rec["method"], path=rec["path"], host=headers["host"], sign_header="signature",
    ).verify()
    if not ok:
        raise ValueError("httpsig: the signature does not verify")
    return key_id, covered, None, None


class Keys(HTTPSignatureKeyResolver):
    def resolve_public_key(self, key_id):
        return load_pem_public_key(public_pem(key_id).encode())

    def resolve_private_key(self, key_id):
        raise NotImplementedError


def check_rfc9421(rec, headers, body):
    alg = re.search(r'alg="([^"]*)"', headers["signature-input"])
    algorithm = {
        "rsa-v1_5-sha256": algorithms.RSA_V1_5_SHA256,
        "rsa-pss-sha512": algorithms.RSA_PSS_SHA512,
    }[alg.group(1) if alg else "rsa-v1_5-sha256"]
    url = f"{rec['scheme']}://{headers['host']}{rec['path']}"
    msg = requests.Request(rec["method"], url, headers=headers, data=body or None).prepare()
    required = ["@method"]
    if rec["method"] == "POST":
        required.append("content-digest")
    label = re.match(r"\s*([a-z*][a-z0-9_\-.*]*)=", headers["signature-input"]).group(1)
    tag = re.search(r'tag="([^"]*)"', headers["signature-input"])
    tag = tag.group(1) if tag else None
    results = HTTPMessageVerifier(signature_algorithm=algorithm, key_resolver=Keys()).verify(
        msg, require_components=required, body=body, expect_tag=tag,
        expect_label=label if tag else None,
    )
    covered = [str(c).strip('"') for c in results[0].covered_components]
    if "@target-uri" not in covered and not ("@authority" in covered and "@path" in covered):
        raise ValueError(f"the signature does not bind the target: {covered}")
    params = results[0].parameters
    if "created" not in params:
        raise ValueError("no created parameter")
    return params["keyid"], covered, label, tag


def main():
    path = sys.argv[1]
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            headers = {k: v for k, v in rec["headers"]}
            body = base64.b64decode(rec["body"])
            if "signature-input" in headers:
                style, check = "rfc9421", check_rfc9421
            elif "signature" in headers:
                style, check = "cavage", check_cavage
            else:
                continue
            r = {"line": n, "server": rec["server"], "method": rec["method"], "path": rec["path"],
                 "status": rec["status"], "style": style, "ok": False, "error": None,
                 "key_id": None, "covered": None, "label": None, "tag": None}
            try:
                r["key_id"], r["covered"], r["label"], r["tag"] = check(rec, headers, body)
                r["ok"] = True
            except Exception as e:  # every failure is reported, none stops the others
                r["error"] = f"{type(e).__name__}: {e}"
            out.append(r)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
