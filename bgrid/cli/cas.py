"""``bgrid cas upload`` and ``bgrid cas download``: files and directory trees to and from
the content-addressable storage."""

import asyncio
import os
import sys

from bgrid.cli import options
from bgrid.cli.options import UsageError
from bgrid.client import tree
from bgrid.client.cas import CasClient


def add_parsers(subparsers):
    """Add ``cas`` and its ``upload`` and ``download`` subcommands."""
    cas_parser = subparsers.add_parser(
        "cas", help="upload files and directories to the CAS, or download them",
        description="Upload files and directories to the content-addressable storage (CAS), "
                    "or download them by digest.",
    )
    commands = cas_parser.add_subparsers(dest="cas_command", metavar="COMMAND", required=True)

    upload = commands.add_parser(
        "upload", help="upload files and directories",
        description="Upload files and directories and print the digest of each as HASH/SIZE "
                    "(size in bytes), followed by its path. A directory is uploaded as "
                    "Directory messages, with its files' executable bits and its symlinks, "
                    "and its root Directory digest is printed. Only blobs that the server "
                    "lacks are sent.",
    )
    upload.add_argument("paths", nargs="+", type=options.existing_path, metavar="PATH",
                        help="file or directory to upload")
    options.add_server_options(upload)
    upload.set_defaults(handler=upload_command)

    download = commands.add_parser(
        "download", help="download a blob or a directory tree",
        description="Download a blob into a file, a Directory tree (--directory) or a Tree "
                    "message (--tree) into a directory. Every downloaded byte is checked "
                    "against its digest.",
    )
    download.add_argument("digest", type=options.digest, metavar="DIGEST",
                          help="digest as HASH/SIZE, size in bytes")
    download.add_argument(
        "destination", metavar="DEST",
        help="file to write, replaced if it exists, or - for standard output; with "
             "--directory or --tree a directory that is created if needed and must be empty",
    )
    message_type = download.add_mutually_exclusive_group()
    message_type.add_argument("--directory", action="store_true",
                      help="DIGEST is a Directory message: download the tree below it")
    message_type.add_argument("--tree", action="store_true",
                      help="DIGEST is a Tree message, as in an ActionResult's output "
                           "directories: download the tree it describes")
    options.add_server_options(download)
    download.set_defaults(handler=download_command, check=check_download_arguments)


async def upload_command(args, channel):
    cas = CasClient(channel, args.instance)
    for path in args.paths:
        if os.path.isdir(path):
            digest = await cas.upload_directory(path)
        else:
            digest = await asyncio.to_thread(tree.hash_file, path)
            await cas.upload_missing(files={digest: path})
        print(f"{digest} {path}", flush=True)
    return 0


def check_download_arguments(args):
    """Raise UsageError for a destination that ``download_command`` would not write to."""
    if args.directory or args.tree:
        if args.destination == "-":
            raise UsageError("a directory cannot be written to standard output; give a directory")
        options.check_empty_or_absent(args.destination, "destination")
    elif args.destination != "-":
        if os.path.isdir(args.destination):
            raise UsageError(
                f"destination {args.destination!r} is a directory; give the path of the file "
                f"to write, or use --directory or --tree for a directory tree"
            )
        parent = os.path.dirname(args.destination) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"the directory {parent!r} of destination {args.destination!r} does not exist")


async def download_command(args, channel):
    cas = CasClient(channel, args.instance)
    if args.directory:
        await cas.download_directory(args.digest, args.destination)
    elif args.tree:
        await cas.download_tree(args.digest, args.destination)
    elif args.destination == "-":
        # The blob is read whole into memory and checked before any byte is written.
        data = await cas.read_blob(args.digest)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        await cas.download_files({args.digest: args.destination})
    return 0
