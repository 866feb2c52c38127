# Shared by the scripts (sourced, not run): how they get root for package
# installs and broker administration, the same everywhere.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
