#!/bin/sh
echo "coverage tools are not available in the offline bgrid e2e workspace" >&2
exit 1
