"""`python -m deeprnn.bench`: see deeprnn.bench.cli."""

import sys

from deeprnn.bench.cli import main
from deeprnn.errors import exit_on_usage_error

with exit_on_usage_error():
    main(sys.argv[1:])
