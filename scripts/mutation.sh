#!/usr/bin/env bash
# Mutation testing: mutmut over the modules setup.cfg's [mutmut] section mutates,
# against its fast in-process tests. Runs in a temporary copy of the working tree, so the
# repository never holds mutated code or mutmut's `mutants/` directory.
#
#   scripts/mutation.sh            # all mutants; prints the survivors
#   MUTMUT_CHILDREN=1 scripts/mutation.sh
#
# Needs `pip install mutmut==3.8.1` (not a project dependency; mutmut 3.3 and 3.4 break on pytest 9).
# About 1,400 mutants, 15-25 minutes on 2 shared cores.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work" 2>/dev/null || true
cd "$work"
export JAX_PLATFORMS=cpu
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" || true
mutmut results | tee "${MUTATION_REPORT:-/dev/null}"
echo "survivors: $(mutmut results | grep -c ': survived' || true)"
