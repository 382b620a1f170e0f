"""Print every optional extra of pyproject.toml, comma-separated (for pip install ".[...]")."""
import tomllib

with open("pyproject.toml", "rb") as f:
    print(",".join(sorted(tomllib.load(f)["project"]["optional-dependencies"])))
