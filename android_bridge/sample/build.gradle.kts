// NOT built in this repository (needs the Android Gradle plugin from Google's Maven).
plugins {
    id("com.android.application") version "8.7.0"
    id("org.jetbrains.kotlin.android") version "2.2.21"
}

android {
    namespace = "dev.fedge.sample"
    compileSdk = 34
    defaultConfig {
        applicationId = "dev.fedge.sample"
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.1"
        buildConfigField("String", "FEDGE_COORDINATOR", "\"https://fl.example.com\"")
        buildConfigField("String", "FEDGE_ENROLLMENT_TOKEN", "\"${System.getenv("FEDGE_ENROLLMENT_TOKEN") ?: ""}\"")
    }
    buildFeatures { buildConfig = true }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }
}

dependencies {
    // the library jar built by scripts/android_bridge.sh (or from a Maven repository)
    implementation(files("../target/fedge-android-0.1.0.jar"))
    implementation("org.jetbrains.kotlin:kotlin-stdlib:2.2.21")
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.29.0")
}
