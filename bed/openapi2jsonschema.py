#!/usr/bin/env python3
"""Turns a Kubernetes OpenAPI v2 document into the JSON schemas kubeconform reads, one file per kind.

kubeconform normally downloads them (yannh/kubernetes-json-schema); CI cannot reach that, so the bed
makes them from the API server of the pinned Kubernetes version instead, the way that project's
openapi2jsonschema does: each kind's schema stands alone (every $ref inlined) and is strict (objects
allow no properties beyond the schema's). The files are named as kubeconform's default location
names them, `<kind>-<group's first label>-<version>.json` (`<kind>-<version>.json` for the core
group), and go into `<out>/v<k8s version>-standalone-strict/`.

    openapi2jsonschema.py SWAGGER_JSON OUT_DIR K8S_VERSION
"""

import json
import sys
from pathlib import Path

REF_PREFIX = "#/definitions/"


def kubeconform_name(group: str, version: str, kind: str) -> str:
    suffix = f"-{group.split('.')[0].lower()}" if group else ""
    return f"{kind.lower()}{suffix}-{version.lower()}.json"


class Converter:
    def __init__(self, definitions: dict):
        self.definitions = definitions

    def special(self, name: str, schema: dict):
        """Types whose JSON form is looser than their OpenAPI description."""
        fmt = schema.get("format")
        if name.endswith(".IntOrString") or fmt == "int-or-string":
            return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
        if name.endswith(".Quantity") or fmt == "quantity":
            return {"oneOf": [{"type": "string"}, {"type": "number"}]}
        return None

    def convert(self, schema, seen: tuple):
        if isinstance(schema, list):
            return [self.convert(item, seen) for item in schema]
        if not isinstance(schema, dict):
            return schema
        ref = schema.get("$ref")
        if ref is not None:
            name = ref[len(REF_PREFIX):]
            target = self.definitions[name]
            loose = self.special(name, target)
            if loose is not None:
                return loose
            if name in seen:
                # A recursive type (JSONSchemaProps): accept anything below the first repetition.
                return {}
            return self.convert(target, seen + (name,))
        out = {}
        for key, value in schema.items():
            if key in ("properties", "patternProperties", "definitions"):
                out[key] = {k: self.convert(v, seen) for k, v in value.items()}
            elif key == "format" and value == "int-or-string":
                continue
            elif key.startswith("x-kubernetes-"):
                if key == "x-kubernetes-int-or-string" and value:
                    return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
                if key == "x-kubernetes-preserve-unknown-fields" and value:
                    out["additionalProperties"] = True
                continue
            else:
                out[key] = self.convert(value, seen)
        # Optional fields may be null (as `key:` with no value renders); required ones may not.
        required = set(out.get("required", []))
        for prop, sub in out.get("properties", {}).items():
            if prop not in required and isinstance(sub, dict) and isinstance(sub.get("type"), str):
                sub["type"] = [sub["type"], "null"]
        # Strict: an object with declared properties allows nothing else.
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out


def main() -> int:
    swagger_path, out_dir, k8s_version = sys.argv[1:4]
    spec = json.loads(Path(swagger_path).read_text())
    definitions = spec["definitions"]
    converter = Converter(definitions)
    target = Path(out_dir) / f"v{k8s_version.lstrip('v')}-standalone-strict"
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, schema in sorted(definitions.items()):
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            standalone = converter.convert(schema, (name,))
            standalone["$schema"] = "http://json-schema.org/schema#"
            # apiVersion and kind are what kubeconform picked the file by; pin them.
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            props = standalone.setdefault("properties", {})
            if "apiVersion" in props:
                props["apiVersion"] = {"type": "string", "enum": [api_version]}
            if "kind" in props:
                props["kind"] = {"type": "string", "enum": [gvk["kind"]]}
            path = target / kubeconform_name(gvk["group"], gvk["version"], gvk["kind"])
            path.write_text(json.dumps(standalone, separators=(",", ":"), sort_keys=True))
            written += 1
    print(f"wrote {written} schemas to {target}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
