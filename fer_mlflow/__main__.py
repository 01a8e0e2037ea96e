from fer_mlflow.cli import main

main()
