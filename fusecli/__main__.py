from fusecli.cli import main

main()
