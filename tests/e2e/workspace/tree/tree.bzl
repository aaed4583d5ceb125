"""A rule whose single action declares a directory output (a tree artifact)."""

def _file_tree_impl(ctx):
    directory = ctx.actions.declare_directory(ctx.label.name)
    ctx.actions.run_shell(
        outputs = [directory],
        arguments = [directory.path],
        command = """
set -eu
mkdir -p "$1/nested/deeper"
printf 'alpha\\n' > "$1/a.txt"
printf 'beta\\n' > "$1/nested/b.txt"
: > "$1/nested/empty.txt"
printf 'gamma\\n' > "$1/nested/deeper/c.txt"
printf '#!/bin/sh\\necho run\\n' > "$1/run.sh"
chmod 0755 "$1/run.sh"
""",
        mnemonic = "FileTree",
        progress_message = "Writing directory %s" % directory.short_path,
    )
    return [DefaultInfo(files = depset([directory]))]

file_tree = rule(
    implementation = _file_tree_impl,
    doc = "Writes a fixed set of files, some in nested subdirectories, into one directory output.",
)
