"""`python3 -m conntrace` is the same as the `conntrace` command."""
from .cli import main

main()
